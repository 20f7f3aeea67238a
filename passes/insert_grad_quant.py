"""insert-grad-quant: a gradient quantizer on the output of every compute op."""
from __future__ import annotations

import torch.fx

from fracpass.pass_base import PassBase, PassResult
from fracpass.passes._quantizers import get_or_add, insert_call, is_quantizer_of, quantized_ops, quantizer_name
from fracpass.quant import GradQuant


class InsertGradQuantPass(PassBase):
    """Quantize the gradient w.r.t. each compute op's output (identity in forward)::

        x -> conv -> y -> bn     becomes   x -> conv -> conv_gq -> bn

    In backward, conv_gq hands conv a stochastically rounded error, which then feeds both the
    input-gradient and the weight-gradient products, as in FracTrain.
    """

    name = "insert-grad-quant"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        inserted = 0
        for op, _, spec in quantized_ops(gm, "grad"):
            if any(is_quantizer_of(user, op, "grad") for user in op.users):
                continue
            name = quantizer_name(op, "grad", 0)
            get_or_add(gm, name, GradQuant, op, stage_bits=spec.g)
            node = insert_call(gm, name, op, after=op, role="grad", op=op, pass_name=self.name)
            op.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
            inserted += 1
        return PassResult(gm, modified=inserted > 0, stats={"grad_quant_inserted": inserted})
