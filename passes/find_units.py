"""find-gated-units: which compute ops one DFQ gate decision covers (an annotation pass)."""
from __future__ import annotations

import dataclasses
import logging
import operator
import re
from typing import Dict, List, Optional, Set

import torch
import torch.fx
from torch import nn

from fracpass import meta
from fracpass.errors import PlanError
from fracpass.pass_base import PassBase, PassResult
from fracpass.plan import Plan
from fracpass.quant import FULL_PRECISION

_ADDS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
# a branch computed from the input's shape, not its values (masks, position ids): not a shortcut
_SHAPE_ONLY = {"size", "dim", "new_zeros", "new_ones", "new_full", "new_empty"}
_SHAPE_FUNCTIONS = {getattr, torch.arange, torch.zeros, torch.ones, torch.full, torch.empty,
                    torch.ops.aten.sym_size.int, torch.ops.aten.arange.default, torch.ops.aten.arange.start,
                    torch.ops.aten.zeros.default, torch.ops.aten.ones.default, torch.ops.aten.full.default}
_ROOT = None  # the virtual root every model input hangs from

log = logging.getLogger("fracpass.passes.find_units")


class FindGatedUnitsPass(PassBase):
    """Group the annotated compute ops into gated units; nodes are annotated, the graph is unchanged::

        x -> conv1 -> bn -> relu -> conv2 -> bn -> add(., x)    one unit {conv1, conv2}, input x,
                                                                   main_arg 0 (on the add node)
        x -> linear -> y      (granularity "op")                 one unit {linear}, input x

    A residual block is an add whose two operands are both reached from one node d: one operand
    is d itself (an identity shortcut), or d dominates the add in the data-flow graph. The operand
    with more compute ops is the residual branch, the other the shortcut, whose ops (a downsample
    conv) stay ungated and at full precision unless a plan rule sets their bits. Nested blocks: an
    op belongs to the innermost one. Gated ops' weights take the gates' w bits. With granularity
    "op", an op whose bits a plan rule sets is left ungated (the rule pins them). Ops inside an
    ``nn.MultiheadAttention`` (sequence-first tensors) are in no unit.
    """

    name = "find-gated-units"

    def __init__(self, plan: Plan):
        self.plan, self.gates, self.num_stages = plan, plan.gates, plan.num_stages

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        nodes = list(graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        data = _data_nodes(nodes)
        shortcuts: List[torch.fx.Node] = []
        units = self._blocks(nodes, order, data, shortcuts) if self.gates.granularity == "block" else self._ops(nodes, data)
        by_name = {n.name: n for n in nodes}
        # nn.MultiheadAttention's internals run sequence-first ((L, B, E), (L*B, E)): a gate's per-sample
        # rows would group them by position, not by sample, so no unit holds them (they keep the stage's bits)
        left = [u for u, _ in units if any(_sequence_first(by_name[op]) for op in u.ops)]
        units = [(dataclasses.replace(u, index=i), a) for i, (u, a) in
                 enumerate((u, a) for u, a in units if u not in left)]
        if left:
            _say_ungated(gm, left, by_name)
        if not units:
            what = ("residual block (an add of a branch of compute ops and a shortcut from the same input)"
                    if self.gates.granularity == "block" else "quantized compute op on the model's data path")
            hint = "use Gates(granularity='op') to gate each compute op" if self.gates.granularity == "block" else \
                "check the plan's exclude rules"
            raise PlanError(f"Gates(granularity={self.gates.granularity!r}) found no {what} in {type(gm).__name__}; {hint}")
        changed = 0
        for unit, anchor in units:
            changed += meta.unit(anchor) != unit
            meta.set_unit(anchor, unit)
            for op_name in unit.ops:
                op = by_name[op_name]
                spec = meta.qspec(op)
                new = dataclasses.replace(spec, w=(self.gates.w,) * self.num_stages,
                                          a=(max(self.gates.a),) * self.num_stages,
                                          g=(max(g for a, g in zip(self.gates.a, self.gates.g) if a),) * self.num_stages)
                changed += meta.gated(op) != unit.name or spec != new
                meta.set_gated(op, unit.name)
                meta.set_qspec(op, new)
        full = (FULL_PRECISION,) * self.num_stages
        for op in shortcuts:
            spec = meta.qspec(op)
            if meta.gated(op) is None and not any(self._sets_bits(i) for i in spec.rules):
                new = dataclasses.replace(spec, w=full, a=full, g=full)
                changed += spec != new
                meta.set_qspec(op, new)
        stats = {"units": len(units), "gated_ops": sum(len(u.ops) for u, _ in units),
                 "ungated_attention_units": tuple(u.name for u in left),
                 "shortcut_ops_full_precision": sum(meta.qspec(op).a == full for op in shortcuts)}
        return PassResult(gm, modified=changed > 0, stats=stats)

    def _sets_bits(self, rule_index: int) -> bool:
        rule = self.plan.rules[rule_index]
        return any(getattr(rule, role) is not None for role in ("w", "a", "g"))

    # -- granularity "block" ----------------------------------------------------------------------
    def _blocks(self, nodes, order, data, shortcuts: List[torch.fx.Node]):
        idom = _dominators(nodes, order, data)
        claimed: Set[str] = set()
        found = []
        for node in nodes:
            if not _is_add(node) or node not in data or meta.inserted(node) is not None:
                continue
            operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node) and a in data]
            if len(operands) != 2:
                continue
            # an identity shortcut: one operand is the other's ancestor, whatever side inputs (an
            # attention mask from another model input) join the residual branch
            d = next((s for s, r in ((operands[1], operands[0]), (operands[0], operands[1]))
                      if _reaches(s, r, order, data)), None) or idom.get(node, _ROOT)
            if d is _ROOT:
                continue
            branches = [_between(arg, d, order, data) for arg in operands]
            ops = [[n for n in b if _gateable(n)] for b in branches]
            main = 0 if len(ops[0]) >= len(ops[1]) else 1
            if not ops[main] or _shape_only(branches[1 - main]):
                continue
            mine = [n for n in sorted(ops[main], key=order.get) if n.name not in claimed]
            if not mine:
                continue
            claimed.update(n.name for n in mine)
            shortcuts.extend(n for n in ops[1 - main] if n not in shortcuts)
            paths = [meta.op_info(n).module_path for n in ops[main]]  # the whole branch names the unit
            found.append((mine, paths, _gate_input(d, branches[main], order), main, node))
        # the shared LSTM visits units in the order their first ops run, so each gate can sit after its
        # input and the previous gate yet before its own ops (an add's position is no such order: LR-ASPP's
        # head add holds a conv that runs before the residual blocks the backbone adds close)
        found.sort(key=lambda f: order[f[0][0]])
        units = []
        for index, (mine, paths, source, main, node) in enumerate(found):
            name = _unit_name(paths, index, {u.name for u, _ in units})
            units.append((meta.Unit(name, index, source.name, tuple(n.name for n in mine), main_arg=main), node))
        return units

    # -- granularity "op" -------------------------------------------------------------------------
    def _ops(self, nodes, data):
        found = []
        for node in nodes:
            if not _gateable(node) or node not in data:
                continue
            if any(self._sets_bits(i) for i in meta.qspec(node).rules):
                continue  # a plan rule pinned this op's bits: the gates leave it
            info = meta.op_info(node)
            source = _first_input(node, info)
            if source is None:
                continue
            found.append((meta.Unit(_sanitize(node.name), len(found), source.name, (node.name,)), node))
        return found


def _say_ungated(gm: torch.fx.GraphModule, left, by_name) -> None:
    """Log which residuals hold nn.MultiheadAttention ops and so get no gate, and why (once per transform:
    the other mode's re-capture finds the gates already in place)."""
    from fracpass.gating import GateHub

    said = ", ".join(f"{u.name} ({', '.join(sorted({meta.op_info(by_name[op]).module_path or op for op in u.ops}))})"
                     for u in left)
    level = logging.DEBUG if isinstance(getattr(gm, "gates", None), GateHub) else logging.WARNING
    log.log(level, "find-gated-units: %d residual block(s) left ungated: %s. Their ops run inside "
            "nn.MultiheadAttention, which computes sequence-first ((L, B, E) tensors), so a gate cannot choose per "
            "sample; they keep the stage's bits (a plan rule can set others)", len(left), said)


def _sequence_first(node: torch.fx.Node) -> bool:
    """Whether ``node`` runs inside an ``nn.MultiheadAttention`` traced into (fracpass.traced)."""
    stack = node.meta.get("nn_module_stack") or {}
    return any(isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], type)
               and issubclass(entry[1], nn.MultiheadAttention) for entry in stack.values())


def _gate_input(d: torch.fx.Node, branch: List[torch.fx.Node], order) -> torch.fx.Node:
    """What a block's gate reads: the block's input d, or where d has several outputs (chunk, unbind,
    split), the first of its outputs that the residual branch uses."""
    if not d.users or any(u.target is not operator.getitem for u in d.users):
        return d
    picked = sorted((u for u in d.users if u in branch), key=order.get)
    return picked[0] if picked else d


def _gateable(node: torch.fx.Node) -> bool:
    spec = meta.qspec(node)
    return meta.op_info(node) is not None and spec is not None and not spec.excluded and meta.inserted(node) is None


def _first_input(node: torch.fx.Node, info: meta.OpInfo) -> Optional[torch.fx.Node]:
    from fracpass import registry

    slots = info.act_args or ((0,),)
    value = registry.get_slot(node, slots[0])
    while isinstance(value, torch.fx.Node) and meta.inserted(value) is not None:  # a quantizer already there
        value = value.args[0]
    return value if isinstance(value, torch.fx.Node) else None


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in _ADD_METHODS


def _data_nodes(nodes) -> Set[torch.fx.Node]:
    """Nodes computed from the model's inputs (not from parameters or constants alone). Gate branches
    are not the model's data flow (they chain every unit through the LSTM state); the skip
    multiplier on a residual branch is."""
    from fracpass.gating import skip_gate

    data: Set[torch.fx.Node] = set()
    for n in nodes:
        info = meta.inserted(n)
        if info is not None and info.role == "gate" and n.target is not skip_gate:
            continue
        if n.op == "placeholder" or (n.op != "get_attr" and any(i in data for i in n.all_input_nodes)):
            data.add(n)
    return data


def _dominators(nodes, order, data) -> Dict[torch.fx.Node, Optional[torch.fx.Node]]:
    """Immediate dominator of every data node in the data-flow DAG (inputs hang from a virtual root).

    One pass in topological order suffices on a DAG (Cooper, Harvey & Kennedy's intersection)."""
    idom: Dict[torch.fx.Node, Optional[torch.fx.Node]] = {}

    def rank(n):
        return -1 if n is _ROOT else order[n]

    def intersect(a, b):
        while a is not b:
            while rank(a) > rank(b):
                a = idom[a]
            while rank(b) > rank(a):
                b = idom[b]
        return a

    for n in nodes:
        if n not in data:
            continue
        preds = [p for p in n.all_input_nodes if p in data]
        if not preds:
            idom[n] = _ROOT
            continue
        d = preds[0]
        for p in preds[1:]:
            d = intersect(d, p)
        idom[n] = d
    return idom


def _reaches(source: torch.fx.Node, target: torch.fx.Node, order, data) -> bool:
    """True if ``source`` is a data ancestor of ``target``."""
    seen: Set[torch.fx.Node] = set()
    stack = [target]
    while stack:
        n = stack.pop()
        if n is source:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(p for p in n.all_input_nodes if p in data and order[p] >= order[source])
    return False


def _between(start: torch.fx.Node, d: torch.fx.Node, order, data) -> List[torch.fx.Node]:
    """Data nodes on the paths from d (exclusive) to ``start`` (inclusive)."""
    seen: Set[torch.fx.Node] = set()
    stack = [start] if start is not d else []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(p for p in n.all_input_nodes if p in data and p is not d and order[p] > order[d])
    return list(seen)


def _shape_only(branch: List[torch.fx.Node]) -> bool:
    return any((n.op == "call_method" and n.target in _SHAPE_ONLY) or
               (n.op == "call_function" and n.target in _SHAPE_FUNCTIONS) for n in branch)


def _sanitize(text: str) -> str:
    return re.sub(r"\W", "_", text).strip("_") or "unit"


def _unit_name(paths: List[str], index: int, taken: Set[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    common: List[str] = []
    for column in zip(*parts) if parts and len(parts) == len(paths) else ():
        if len(set(column)) != 1:
            break
        common.append(column[0])
    name = _sanitize(".".join(common)) if common else f"unit{index}"
    if name in taken or name in ("lstm", "proj"):
        name = f"{name}_{index}"
    return name
