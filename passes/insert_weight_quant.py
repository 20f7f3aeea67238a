"""insert-weight-quant: a weight quantizer on every weight of a compute op (per output channel, or per tensor
where a plan rule says weight_scale="tensor")."""
from __future__ import annotations

import torch.fx

from fracpass import meta, registry
from fracpass.errors import RegistryError
from fracpass.pass_base import PassBase, PassResult, node_context
from fracpass.passes._quantizers import get_or_add, insert_call, is_quantizer_of, quantized_ops, quantizer_name
from fracpass.quant import WeightQuant


class InsertWeightQuantPass(PassBase):
    """Quantize each weight operand; a module call is lowered to its functional form first::

        x -> conv(module) -> y   becomes   x -> F.conv2d(x, conv_wq(conv.weight), conv.bias) -> y
        x -> linear(x, w) -> y   becomes   x -> linear(x, linear_wq(w)) -> y

    Lowering keeps the node's name, parameter names (``conv.weight``) and numerics bit for bit.
    """

    name = "insert-weight-quant"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        inserted = lowered = 0
        for op, info, spec in quantized_ops(gm, "weight"):
            if info.module_weight:
                op, info = self._lower(gm, op, info)
                lowered += 1
            for index, (slot, axis) in enumerate(zip(info.weight_args, info.weight_axes)):
                src = registry.get_slot(op, slot)
                if not isinstance(src, torch.fx.Node) or is_quantizer_of(src, op, "weight"):
                    continue
                name = quantizer_name(op, "weight", index)
                # a rule's weight_scale="tensor": one scale per weight instead of per output channel
                get_or_add(gm, name, WeightQuant, op, stage_bits=spec.w, axis=None if spec.weight_scale == "tensor" else axis)
                node = insert_call(gm, name, src, before=op, role="weight", op=op, pass_name=self.name)
                registry.set_slot(op, slot, node)
                inserted += 1
        return PassResult(gm, modified=(inserted + lowered) > 0,
                          stats={"weight_quant_inserted": inserted, "modules_lowered": lowered})

    def _lower(self, gm: torch.fx.GraphModule, op: torch.fx.Node, info: meta.OpInfo):
        entry = registry.lookup(gm, op)
        if entry is None or entry.lower is None:
            raise RegistryError(
                f"{node_context(op)}\n  op kind {info.kind!r} has no lowering to a functional call, so its weight "
                "cannot be quantized; add `lower=` to its OpKind in fracpass.registry, or exclude the op in the plan"
            )
        spec = meta.qspec(op)
        new = entry.lower(gm, op)
        new_info = registry.classify(gm, new)
        meta.set_op_info(new, new_info)
        meta.set_qspec(new, spec)
        return new, new_info
