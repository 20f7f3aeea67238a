"""insert-gates: a gate branch per gated unit, wired as graph nodes (FracTrain's DFQ)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
from typing import Any, Dict, List, Sequence, Tuple

import torch.fx

from fracpass import costing, meta
from fracpass.errors import PassError, PlanError
from fracpass.gating import GateHub, skip_gate
from fracpass.quant import FULL_PRECISION
from fracpass.pass_base import PassBase, PassResult
from fracpass.passes._quantizers import gate_choices
from fracpass.plan import Gates, Plan

log = logging.getLogger("fracpass.passes.insert_gates")

HUB = "gates"  # submodule holding every gate; parameters are gates.<unit>.fc1.weight, gates.lstm.*, gates.proj.*


class InsertGatesPass(PassBase):
    """Insert each unit's gate after the unit's input, chained through the shared LSTM state::

        x -> [block: conv1 ... conv2] -> add(., x)
    becomes
        x -> gates(x, state_prev, i) -> (choice, state) ;  x -> [block] -> skip_gate(., choice) -> add(., x)

    ``choice`` (B, K) is the hard one-hot the unit's quantizers read (insert-act-quant and
    insert-grad-quant wire it in); ``skip_gate`` appears only when an option has a = 0. The
    per-option costs the gate loss needs come from the cost analysis of the example inputs.
    """

    name = "insert-gates"

    def __init__(self, plan: Plan, args: Sequence[Any], kwargs: Dict[str, Any]):
        self.plan, self.gates = plan, plan.gates
        self.args, self.kwargs = tuple(args), dict(kwargs)

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not self.args and not self.kwargs:
            raise PassError("insert-gates: a plan with gates needs example inputs (the gates' sizes and the per-option "
                            "costs depend on them); pass example_inputs=(x,) to fracpass.transform")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        units = sorted(((meta.unit(n), n) for n in gm.graph.nodes if meta.unit(n) is not None), key=lambda u: u[0].index)
        if gate_choices(gm):  # already inserted
            return PassResult(gm, modified=False, stats={"gates_inserted": 0, "skip_gates": 0})
        existing = getattr(gm, HUB, None)
        with existing.keeping_choices() if isinstance(existing, GateHub) else contextlib.nullcontext():
            # a re-capture (the other train/eval mode) runs the gates on the example inputs
            inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
            report = costing.analyze(gm, self.args, self.kwargs, self.plan.num_stages, 0,
                                     watch=[u.input for u, _ in units] + inputs)
        batches = [s[0] for s in (report.node_shapes.get(n) for n in inputs) if s]
        self._check_batch_first(units, report, batches[0] if batches else None)
        hub = self._hub(gm, [u for u, _ in units], report, existing)
        by_name = {n.name: n for n in gm.graph.nodes}
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        state, last, last_rank, skips = None, None, -1, 0
        for unit, anchor in units:
            source = by_name[unit.input]
            after = source if order[source] > last_rank else last
            with gm.graph.inserting_after(after):
                call = gm.graph.create_node("call_module", HUB, (source, state, unit.index), name=f"gate_{unit.name}")
            with gm.graph.inserting_after(call):
                choice = gm.graph.create_node("call_function", operator.getitem, (call, 0), name=f"gate_{unit.name}_choice")
            with gm.graph.inserting_after(choice):
                state = gm.graph.create_node("call_function", operator.getitem, (call, 1), name=f"gate_{unit.name}_state")
            for node in (call, choice, state):
                meta.set_inserted(node, meta.Inserted(role="gate", source=unit.name, created_by=self.name))
            last, last_rank = state, max(last_rank, order[source])
            if self.gates.skip_options and unit.main_arg is not None:
                main = anchor.args[unit.main_arg]
                with gm.graph.inserting_before(anchor):
                    gated = gm.graph.create_node("call_function", skip_gate, (main, choice, self.gates.skip_options),
                                                 name=f"gate_{unit.name}_skip")
                meta.set_inserted(gated, meta.Inserted(role="gate", source=unit.name, created_by=self.name))
                anchor.update_arg(unit.main_arg, gated)
                skips += 1
        try:
            gm.graph.lint()
        except RuntimeError as e:
            raise PassError(f"insert-gates: a gate could not be placed before the ops it drives ({e}); the gated units "
                            "interleave in a way the shared LSTM order cannot follow; use Gates(granularity='op') or "
                            "exclude the interleaved ops") from e
        return PassResult(gm, modified=True, stats={"gates_inserted": len(units), "skip_gates": skips,
                                                    "gate_parameters": sum(p.numel() for p in hub.parameters())})

    @staticmethod
    def _check_batch_first(units, report, batch) -> None:
        """A gate picks bits per sample, so its unit's input must lead with the batch dimension. A unit
        that does not (an op on a sequence-first (L, B, E) tensor) is refused here, at transform time,
        rather than failing in the first batch. (find-gated-units already leaves out the ops inside
        ``nn.MultiheadAttention``, which compute that way.)"""
        for unit, node in units:
            shape = report.node_shapes.get(unit.input)
            if batch is None or not shape or shape[0] == batch:
                continue
            module = meta.op_info(node).module_path if meta.op_info(node) else ""
            raise PlanError(f"gated unit {unit.name!r}: its input {unit.input!r} has shape {tuple(shape)}, whose first "
                            f"dimension is not the example batch ({batch}), so a gate cannot choose per sample (a "
                            "sequence-first layout?); give these ops fixed bits with a plan "
                            f"rule so the gates leave them, e.g. Rule(match={(module or unit.name)!r}, w=8, a=8, g=8)")

    def _hub(self, gm: torch.fx.GraphModule, units: List[meta.Unit], report, existing) -> GateHub:
        gates: Gates = self.gates
        costs = {o.op: o for o in report.ops}
        fp32 = sum(m * bx * by for o in report.ops for _, m, bx, by, _ in o.products(None)) or 1
        gated = {op for u in units for op in u.ops}
        base = [100 * sum(m * bx * by for o in report.ops if o.op not in gated for _, m, bx, by, _ in o.products(k)) / fp32
                for k in range(self.plan.num_stages)]
        unit_costs, channels, dims = [], [], []
        for unit in units:
            row = []
            for a, g in zip(gates.a, gates.g):
                bitops = 0
                for op in unit.ops:
                    if a and op in costs:
                        one = dataclasses.replace(costs[op], w=(gates.w,), a=(a,), g=(g,))
                        bitops += sum(m * bx * by for _, m, bx, by, _ in one.products(0))
                row.append(100 * bitops / fp32)
            unit_costs.append(row)
            shape = report.node_shapes.get(unit.input)
            first = costs.get(unit.ops[0])
            dim = 1 if first is not None and first.kind.startswith("conv") else -1
            if not shape or len(shape) < 2:
                raise PassError(f"insert-gates: the input of gated unit {unit.name!r} ({unit.input}) has shape {shape}; a "
                                "gate needs a batch dimension and a channel dimension")
            channels.append(shape[dim])
            dims.append(dim)
        names = [u.name for u in units]
        if existing is None:  # once per transform, not on the other mode's re-capture
            quantized = [_quantized_share(report.ops, gated, k, fp32) for k in range(self.plan.num_stages)]
            _warn_unreachable_targets(gates.targets(self.plan.num_stages), base, unit_costs, quantized)
        if existing is not None:
            if not isinstance(existing, GateHub) or existing.unit_names != names:
                raise PassError(f"insert-gates: the model already has a submodule {HUB!r} ({type(existing).__name__}) "
                                "that is not this plan's gates; rename it, or transform the original model rather than "
                                "an already transformed one")
            return existing
        hub = GateHub(gates.a, gates.g, gates.w, names, channels, dims, unit_costs, base,
                      gates.targets(self.plan.num_stages), gates.beta, gates.controller)
        gm.add_submodule(HUB, hub)
        return hub


def _quantized_share(ops, gated, stage: int, fp32: float) -> Tuple[float, float]:
    """(FP32 BitOPs of the ops quantized at ``stage``, gated ones included, in % of the model's; the cost of the
    quantized ungated ones at the stage's bits, in % of the model's FP32 BitOPs): what FracTrain's paper counts."""
    def quantized(o) -> bool:
        return o.op in gated or (not o.excluded and min(o.w[stage], o.a[stage], o.g[stage]) < FULL_PRECISION)

    share = sum(m * bx * by for o in ops if quantized(o) for _, m, bx, by, _ in o.products(None))
    ungated = sum(m * bx * by for o in ops if quantized(o) and o.op not in gated for _, m, bx, by, _ in o.products(stage))
    return 100 * share / fp32, 100 * ungated / fp32


def _warn_unreachable_targets(targets: Sequence[float], base: Sequence[float], unit_costs,
                              quantized: Sequence[Tuple[float, float]] = ()) -> None:
    """Warn for each stage whose cost target lies below the cheapest mix the gates can choose, both in the
    controller's units (% of the whole model's FP32 training BitOPs, full-precision ops at 32 bits), the
    units the gates steer in. Where some ops run at full precision, the warning also gives the cheapest mix
    in FracTrain's paper's units (the quantized ops only), so that a target copied from the paper is read
    against the right figure."""
    cheapest_units = sum(min(row) for row in unit_costs)
    for k, target in enumerate(targets):
        floor = base[k] + cheapest_units
        if target >= floor:
            continue
        paper = ""
        if k < len(quantized) and 0 < quantized[k][0] < 100 - 1e-9:
            share, ungated = quantized[k]
            paper_floor = 100 * (ungated + cheapest_units) / share
            paper = (f" (FracTrain's paper counts only the quantized ops, {share:.1f}% of this model's FP32 BitOPs: there "
                     f"the cheapest mix is {paper_floor:.3f}%, and a paper target t is (t * {share / 100:.4f} + "
                     f"{100 - share:.3f})% in the controller's units)")
        log.warning("insert-gates: stage %d's cost target %.3g%% of FP32 lies below the cheapest mix the gates can "
                    "choose on this model (%.3f%% of the whole model's FP32 training BitOPs, the units the gates' "
                    "controller steers in: every unit at its cheapest option, ungated ops at the stage's bits, "
                    "full-precision ops at 32 bits)%s, so every sample will take the cheapest option; set "
                    "Gates(target=...) to at least %.3f%% at that stage, or add a cheaper option (a=0 skips a block)",
                    k, target, floor, paper, floor)


def unit_summary(gm: torch.fx.GraphModule) -> List[Tuple[str, Tuple[str, ...]]]:
    """(unit, its ops) in graph order."""
    units = sorted((meta.unit(n) for n in gm.graph.nodes if meta.unit(n) is not None), key=lambda u: u.index)
    return [(u.name, u.ops) for u in units]
