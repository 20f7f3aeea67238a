"""insert-grad-quant: a gradient quantizer on the output of every compute op."""
from __future__ import annotations

import torch.fx

from fracpass.pass_base import PassBase, PassResult
from fracpass.gating import GatedGradQuant
from fracpass.passes._quantizers import (gate_choices, gated_choice, get_or_add, insert_call, is_quantizer_of,
                                         quantized_ops, quantizer_name)
from fracpass.quant import GradQuant


class InsertGradQuantPass(PassBase):
    """Quantize the gradient w.r.t. each compute op's output (identity in forward)::

        x -> conv -> y -> bn     becomes   x -> conv -> conv_gq -> bn

    In backward, conv_gq hands conv a stochastically rounded error, which then feeds both the
    input-gradient and the weight-gradient products, as in FracTrain. In a gated unit,
    ``conv_gq(y, gate_choice)`` rounds each sample's gradient at its option's g bits.
    """

    name = "insert-grad-quant"

    def __init__(self, plan=None):
        self.gates = plan.gates if plan is not None else None

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        inserted = gated = 0
        choices = gate_choices(gm)
        options = () if self.gates is None else tuple(g for a, g in zip(self.gates.a, self.gates.g) if a)
        for op, _, spec in quantized_ops(gm, "grad", options):
            if any(is_quantizer_of(user, op, "grad") for user in op.users):
                continue
            choice = gated_choice(choices, op)
            name = quantizer_name(op, "grad", 0)
            if choice is None:
                get_or_add(gm, name, GradQuant, op, stage_bits=spec.g)
            else:
                # a skip option's g is unused (the sample's block output is dropped); 32 = pass through
                options = tuple(g if a else 32 for a, g in zip(self.gates.a, self.gates.g))
                get_or_add(gm, name, GatedGradQuant, op, options=options, num_stages=len(spec.g))
                gated += 1
            node = insert_call(gm, name, op, after=op, role="grad", op=op, pass_name=self.name,
                               extra=() if choice is None else (choice,))
            op.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
            inserted += 1
        return PassResult(gm, modified=inserted > 0, stats={"grad_quant_inserted": inserted, "gated": gated})
