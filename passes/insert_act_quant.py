"""insert-act-quant: a per-tensor activation quantizer on every activation input of a compute op."""
from __future__ import annotations

import torch.fx

from fracpass import registry
from fracpass.pass_base import PassBase, PassResult
from fracpass.gating import GatedActQuant
from fracpass.passes._quantizers import (gate_choices, gated_choice, get_or_add, insert_call, is_quantizer_of,
                                         quantized_ops, quantizer_name)
from fracpass.quant import ActQuant


class InsertActQuantPass(PassBase):
    """Quantize each activation input of each annotated compute op that quantizes activations::

        x -> conv -> y           becomes   x -> conv_aq -> conv -> y
        q, k -> matmul -> s      becomes   q -> matmul_aq, k -> matmul_aq1 -> matmul -> s

    Each op gets its own quantizer even when inputs are shared: ops can differ in bits. An op in
    a gated unit gets a GatedActQuant that also reads its gate's choice::

        x -> conv -> y           becomes   x -> conv_aq(x, gate_choice) -> conv -> y
    """

    name = "insert-act-quant"

    def __init__(self, plan=None):
        self.gates = plan.gates if plan is not None else None

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        inserted = gated = 0
        choices = gate_choices(gm)
        for op, info, spec in quantized_ops(gm, "act", self._option_bits()):
            choice = gated_choice(choices, op)
            for index, slot in enumerate(info.act_args):
                src = registry.get_slot(op, slot)
                if not isinstance(src, torch.fx.Node) or is_quantizer_of(src, op, "act"):
                    continue
                name = quantizer_name(op, "act", index)
                if choice is None:
                    get_or_add(gm, name, ActQuant, op, stage_bits=spec.a)
                else:
                    get_or_add(gm, name, GatedActQuant, op, options=self.gates.a, num_stages=len(spec.a))
                    gated += 1
                node = insert_call(gm, name, src, before=op, role="act", op=op, pass_name=self.name,
                                   extra=() if choice is None else (choice,))
                registry.set_slot(op, slot, node)
                inserted += 1
        return PassResult(gm, modified=inserted > 0, stats={"act_quant_inserted": inserted, "gated": gated})

    def _option_bits(self):
        return self.gates.a if self.gates is not None else ()

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        for op, info, _ in quantized_ops(gm, "act", self._option_bits()):
            for slot in info.act_args:
                src = registry.get_slot(op, slot)
                if isinstance(src, torch.fx.Node) and not is_quantizer_of(src, op, "act"):
                    raise AssertionError(f"{op.format_node()} has an unquantized activation input {src.name}")
