"""CI checks of graph rewrites: a canonical text of the rewritten graph, golden-file comparison with
a readable diff, and quantization coverage.

The text has one line per node in graph (topological) order::

    %layer1_0_conv1_aq = quant.act[a 3>4>6>8](%relu)
    %layer1_0_conv1 = conv2d @layer1.0.conv1 torch.conv2d(%layer1_0_conv1_aq, %layer1_0_conv1_wq, None, ...)

It holds names, targets by qualified name, constants, module paths and per-stage bits — nothing
that depends on memory addresses, dict order, hash seeds or the run.
"""
from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx
from torch import nn

from fracpass import meta, registry
from fracpass.quant import FULL_PRECISION

__all__ = ["graph_text", "coverage", "Coverage", "compare_text", "GoldenMismatch"]


def _ladder(bits) -> str:
    return ">".join("fp32" if b >= FULL_PRECISION else str(b) for b in bits)


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    name = getattr(target, "__name__", None)
    # public aliases first: where torch keeps a builtin varies between versions
    for prefix, namespace in (("torch", torch), ("torch.nn.functional", torch.nn.functional), ("operator", operator)):
        if name and getattr(namespace, name, None) is target:
            return f"{prefix}.{name}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__name__
    return f"{module}.{name}" if module and module != "builtins" else name


def _arg(value: Any) -> str:
    if isinstance(value, torch.fx.Node):
        return f"%{value.name}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_arg(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!s}: {_arg(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, bool, str, type(None), slice)) or value is Ellipsis:
        return repr(value)
    return type(value).__name__  # never an address


def _call(node: torch.fx.Node) -> str:
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in sorted(node.kwargs.items())]
    return "(" + ", ".join(args) + ")"


def graph_text(qmodel: nn.Module) -> str:
    """The canonical, stable text of a transformed model's graph (the current train/eval graph)."""
    from fracpass.state import model_state

    state = model_state(qmodel)
    plan = state.plan
    lines = [f"# fracpass graph: {type(qmodel).__name__}, captured with {state.method}, "
             f"{'train' if state.graph_mode else 'eval'} graph",
             "# stages (w/a/g): " + ", ".join(f"{s.w}/{s.a}/{s.g}" for s in plan.stages)]
    for node in qmodel.graph.nodes:
        lines.append(_node_line(qmodel, node))
    return "\n".join(lines) + "\n"


def _node_line(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    name = f"%{node.name}"
    if node.op == "placeholder":
        return f"{name} = input {node.target}"
    if node.op == "output":
        return f"output {_arg(node.args[0])}"
    if node.op == "get_attr":
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            try:
                value = gm.get_buffer(node.target)
            except AttributeError:
                value = None
        shape = f" {list(value.shape)}" if isinstance(value, torch.Tensor) else ""
        return f"{name} = get_attr {node.target}{shape}"
    inserted = meta.inserted(node)
    if inserted is not None and inserted.role in meta.PLAN_FIELD:
        q = gm.get_submodule(node.target)
        field = meta.PLAN_FIELD[inserted.role]
        extra = f" axis={q.axis}" if inserted.role == "weight" else ""
        if len(node.args) > 1:  # gated: bits per sample from the gate's choice
            options = "(" + ",".join(map(str, q.options.tolist())) + ")"
            return f"{name} = quant.{inserted.role}[{field} options {options}]({_arg(node.args[0])}, {_arg(node.args[1])})"
        return f"{name} = quant.{inserted.role}[{field} {_ladder(q.stage_bits.tolist())}{extra}]({_arg(node.args[0])})"
    if inserted is not None:  # a gate branch node
        return f"{name} = gate {_target_name(node) if node.op != 'call_module' else node.target}{_call(node)}"
    info, spec = meta.op_info(node), meta.qspec(node)
    if node.op == "call_module":
        target = f"{type(gm.get_submodule(node.target)).__name__} {node.target}"
    elif node.op == "call_method":
        target = f".{node.target}"
    else:
        target = _target_name(node)
    line = f"{name} = "
    if info is not None:
        traits = f"/{','.join(info.traits)}" if info.traits else ""
        line += f"{info.kind}{traits} @{info.module_path or '<root>'} "
    line += f"{target}{_call(node)}"
    if spec is not None and spec.excluded:
        line += f"  # excluded: {spec.excluded}"
    return line


# -- golden comparison --------------------------------------------------------------------------
@dataclass
class GoldenMismatch:
    path: str
    diff: List[str]  # unified diff lines
    summary: List[str]  # human sentences: what changed

    def __str__(self) -> str:
        return "\n".join([f"{self.path}: the graph differs from the golden file:"] + [f"  {s}" for s in self.summary]
                         + self.diff)


def compare_text(golden: str, current: str, path: str) -> Optional[GoldenMismatch]:
    """None when equal; else the unified diff (-golden / +current) and a summary of what changed."""
    if golden == current:
        return None
    diff = list(difflib.unified_diff(golden.splitlines(), current.splitlines(), f"{path} (golden)", f"{path} (now)",
                                     lineterm=""))
    return GoldenMismatch(path, diff, _summarise(golden.splitlines(), current.splitlines()))


def _node_of(line: str) -> Optional[str]:
    return line.split(" = ", 1)[0] if line.startswith("%") and " = " in line else None


def _summarise(old: List[str], new: List[str]) -> List[str]:
    before = {_node_of(l): l for l in old if _node_of(l)}
    after = {_node_of(l): l for l in new if _node_of(l)}
    out = []
    for name in [n for n in after if n not in before]:
        out.append(f"added {name}: {after[name].split(' = ', 1)[1][:120]}")
    for name in [n for n in before if n not in after]:
        out.append(f"removed {name}: {before[name].split(' = ', 1)[1][:120]}")
    for name in [n for n in before if n in after and before[n] != after[n]]:
        out.append(f"changed {name}: {before[name].split(' = ', 1)[1][:80]}  ->  {after[name].split(' = ', 1)[1][:80]}")
    header_old = [l for l in old if l.startswith("#")]
    header_new = [l for l in new if l.startswith("#")]
    if header_old != header_new:
        out.append(f"header changed: {header_old} -> {header_new}")
    return out


# -- coverage -----------------------------------------------------------------------------------
def _why_not(plan, spec) -> str:
    if spec is not None and spec.excluded:
        rule = [i for i in spec.rules if plan.rules[i].exclude][-1]
        return f"excluded by plan rule {rule} ({plan.rules[rule].describe()}): {spec.excluded}"
    return "the plan keeps this role at 32 bits (full precision) in every stage"


ROLES = ("act", "weight", "grad")


@dataclass
class Coverage:
    """Share of compute ops (and of forward MACs) quantized per role, and why the rest are not."""

    ops: Dict[str, Tuple[int, int]]  # role -> (quantized, applicable)
    macs: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # role -> (quantized MACs, applicable MACs)
    unquantized: List[Tuple[str, str, str]] = field(default_factory=list)  # (op, role(s), reason)
    unmeasured: List[str] = field(default_factory=list)  # opaque calls whose MACs no rule could count
    # execution="native" only: op -> (path at the current stage, why not native / which products run in fp32)
    paths: Dict[str, Tuple[str, str]] = field(default_factory=dict)

    def fraction(self, role: str, by: str = "ops") -> float:
        done, total = (self.ops if by == "ops" else self.macs)[role]
        return 1.0 if total == 0 else done / total

    @property
    def minimum(self) -> float:
        """The lowest per-role share of compute ops (what --min-coverage compares against)."""
        return min(self.fraction(r) for r in ROLES)

    def to_dict(self) -> Dict[str, Any]:
        return {"ops": {r: {"quantized": q, "total": t, "fraction": self.fraction(r)} for r, (q, t) in self.ops.items()},
                "macs": {r: {"quantized": q, "total": t, "fraction": self.fraction(r, "macs")}
                         for r, (q, t) in self.macs.items()},
                "minimum": self.minimum, "macs_unknown_for": list(self.unmeasured),
                "unquantized": [{"op": o, "roles": r, "reason": why} for o, r, why in self.unquantized],
                "paths": {o: {"path": p, "note": why} for o, (p, why) in self.paths.items()}}

    def __str__(self) -> str:
        lines = ["coverage (quantized / compute ops that have the role):"]
        for r in ROLES:
            q, t = self.ops[r]
            line = f"  {r:6s} {q}/{t} ops ({100 * self.fraction(r):.1f}%)"
            if self.macs:
                line += f", {100 * self.fraction(r, 'macs'):.1f}% of forward MACs"
                if self.unmeasured:
                    line += " that could be counted"
            lines.append(line)
        if self.macs and self.unmeasured:
            lines.append(f"  MACs unknown (not in the totals) for: {', '.join(self.unmeasured)}")
        for op, roles, why in self.unquantized:
            lines.append(f"  not quantized: {op} [{roles}]: {why}")
        for op, (path, why) in self.paths.items():
            lines.append(f"  path {op}: {path}" + (f": {why}" if why else ""))
        return "\n".join(lines)


def coverage(qmodel: nn.Module, example_inputs=(), example_kwargs=None) -> Coverage:
    """Which compute ops are quantized per role, which are not and why; MACs-weighted when the
    model can be costed (example inputs default to those given to transform).

    Calls fracpass cannot see into (leaf modules, ``torch.fx.wrap``'ped functions) count as
    unquantized ops, and their MACs, measured with FlopCounterMode's rules, as unquantized MACs."""
    from fracpass.api import cost
    from fracpass.state import model_state
    from fracpass.costing import uncosted

    state = model_state(qmodel)
    quantizers_of: Dict[str, set] = {}
    for node in qmodel.graph.nodes:
        ins = meta.inserted(node)
        if ins is not None:
            quantizers_of.setdefault(ins.source, set()).add(ins.role)
    counts = {r: [0, 0] for r in ROLES}
    unquantized: List[Tuple[str, str, str]] = []
    per_op_roles: Dict[str, Tuple[set, set]] = {}
    for node in qmodel.graph.nodes:
        info, spec = meta.op_info(node), meta.qspec(node)
        if info is None:
            continue
        applicable = {"act"} if info.act_args else set()
        if info.weight_args or info.module_weight:
            applicable.add("weight")
        applicable.add("grad")
        done = quantizers_of.get(node.name, set()) & applicable
        per_op_roles[node.name] = (applicable, done)
        missing = sorted(applicable - done)
        if missing:
            unquantized.append((node.name, ",".join(missing), _why_not(state.plan, spec)))
    report = None
    if example_inputs or example_kwargs or state.args or state.kwargs:
        try:
            report = cost(qmodel, example_inputs, example_kwargs)
        except Exception:  # coverage by ops still stands when a model cannot be run for costing
            report = None
    # opaque calls: measured ones from the cost report, the rest (no MAC count) from the graph alone
    opaque = [(op.op, op.excluded, op.forward_macs, op.operand_elems[1] > 0)
              for op in (report.ops if report is not None else ()) if op.kind == "opaque"]
    measured = {name for name, *_ in opaque}
    for name, why in uncosted(qmodel):
        if name not in measured:
            node = next(n for n in qmodel.graph.nodes if n.name == name)
            weighted = any(True for _ in qmodel.get_submodule(node.target).parameters()) if node.op == "call_module" \
                else any(registry.parameter_of(qmodel, a) is not None for a in node.all_input_nodes)
            opaque.append((name, why, None, weighted))
    for name, why, macs, weighted in opaque:
        roles = {"act", "grad"} | ({"weight"} if weighted else set())
        per_op_roles[name] = (roles, set())
        unquantized.append((name, ",".join(sorted(roles)), why if macs is None else f"{why} ({macs:,} forward MACs)"))
    for applicable, done in per_op_roles.values():
        for r in applicable:
            counts[r][1] += 1
            counts[r][0] += r in done
    result = Coverage({r: (q, t) for r, (q, t) in counts.items()}, unquantized=unquantized,
                      unmeasured=[name for name, _, macs, _ in opaque if macs is None])
    if getattr(state, "execution", "simulate") == "native":
        from fracpass.native import op_paths

        result.paths = op_paths(qmodel)
    if report is not None:
        macs = {r: [0.0, 0.0] for r in ROLES}
        for op in report.ops:
            applicable, done = per_op_roles.get(op.op, (set(), set()))
            for r in applicable:
                macs[r][1] += op.forward_macs
                macs[r][0] += op.forward_macs if r in done else 0
        result.macs = {r: (q, t) for r, (q, t) in macs.items()}
    return result
