"""Measured training-step time beside the cost model's prediction, per op and per stage (issue 11).

``fracpass.bench(qmodel, target="epyc9655")`` times one forward + backward of the transformed model
at each stage, and each compute op's share of it, and prints next to them the latency the hardware
profile predicts, scaled to the cores the run used::

    op   kind    path  fwd ms  bwd ms  as run ms  at bits ms  measured / as run
    ...

* **at bits**: the cost model's roofline, max(MACs / rate, bytes / bandwidth) per product, at the
  op's bits (``CostReport.latency_s``): what the profile says training at these bits costs.
* **as run**: the same roofline at the precision each product actually runs on here: int8 where
  native execution runs it on int8 codes, bf16 where on bfloat16 codes (16-bit operands), fp32
  otherwise (a simulated op computes in float32 on quantized values). ``measured / as run`` is how far the kernels and the quantizers' own work are
  from the profile's peak; ``as run / at bits`` is what is not native yet. Below each table, why each simulated op is
  simulated (``fracpass.native.op_paths``: too small for its products to pay, no units, ...).
* **FP32 baseline**: each stage's plain step is timed interleaved with the same graph's step with every
  quantizer passing its tensor through, in the same process, and the report gives their ratio.

An op's time is its group's: the compute node and the quantizers the passes inserted for it (a
native op is one node holding them). Forward times come from running the graph node by node
(``torch.fx.Interpreter``); backward times from marks at the group's boundary: identity autograd
functions on the tensors entering and leaving it, whose backward records when the gradient
reached them. The autograd engine on the CPU runs one node at a time, latest-created first, so the
window holds the group's own backward; where branches join, a neighbour's backward may fall inside
one op's window. The marks copy each boundary tensor (so in-place ops downstream stay legal): the
per-op runs are slower than the plain step, which is timed separately, without them.

The model is benchmarked on a deep copy: its ranges, stage, gradients and RNG are left as they were.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_arg

from fracpass import meta
from fracpass.errors import FracpassError

__all__ = ["bench", "BenchReport", "StageBench", "OpTiming"]

_ROLES = ("act", "weight", "grad")


@dataclass(frozen=True)
class OpTiming:
    op: str
    kind: str
    path: str  # "int8", "bf16", "simulated" (from fracpass.native.op_paths) or "fp32" (excluded op)
    runs_on: Tuple[str, ...]  # per product, as the cost report lists them: "int8", "fp8", "bf16" or "fp32"
    forward_s: float
    backward_s: Optional[float]  # None: no input of the op needs a gradient
    as_run_s: float  # predicted, forward + backward
    at_bits_s: float
    as_run_forward_s: float
    at_bits_forward_s: float
    why: str = ""  # why a simulated op is simulated, what runs in fp32 (fracpass.native.op_paths' note)

    @property
    def measured_s(self) -> float:
        return self.forward_s + (self.backward_s or 0.0)


@dataclass(frozen=True)
class StageBench:
    stage: int
    bits: str  # "w/a/g" of the stage's first rule, as the summary writes it
    step_s: float  # median forward + backward, plain run
    step_spread: Tuple[float, float]  # min, max over the repeats
    ops: Tuple[OpTiming, ...]
    fp32_step_s: float = 0.0  # median of the FP32 baseline's steps, interleaved with the plain run's

    @property
    def ops_s(self) -> float:
        return sum(o.measured_s for o in self.ops)

    @property
    def as_run_s(self) -> float:
        return sum(o.as_run_s for o in self.ops)

    @property
    def at_bits_s(self) -> float:
        return sum(o.at_bits_s for o in self.ops)


@dataclass(frozen=True)
class BenchReport:
    target: str  # the profile, as scaled
    threads: int
    execution: str
    batch: int
    repeats: int
    stages: Tuple[StageBench, ...]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"fracpass bench: {self.execution} execution, batch {self.batch}, {self.threads} thread(s), "
                 f"medians of {self.repeats}; predicted on {self.target}"]
        for st in self.stages:
            lines.append("")
            lines.append(f"stage {st.stage} ({st.bits}): step {_ms(st.step_s)} ms measured "
                         f"({_ms(st.step_spread[0])}-{_ms(st.step_spread[1])}), {st.step_s / st.fp32_step_s:.2f}x the FP32 "
                         f"baseline's {_ms(st.fp32_step_s)} ms; compute ops {_ms(st.ops_s)} ms measured "
                         f"(instrumented), predicted {_ms(st.as_run_s)} ms as run, {_ms(st.at_bits_s)} ms at bits")
            rows = [("op", "kind", "path", "fwd ms", "bwd ms", "as run ms", "at bits ms", "measured / as run")]
            for o in st.ops:
                rows.append((o.op, o.kind, "/".join(o.runs_on) if o.path in ("int8", "bf16") else o.path, _ms(o.forward_s),
                             "-" if o.backward_s is None else _ms(o.backward_s), _ms(o.as_run_s), _ms(o.at_bits_s),
                             f"{o.measured_s / o.as_run_s:.1f}x" if o.as_run_s > 0 else "-"))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for k, r in enumerate(rows):
                lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
                if k == 0:
                    lines.append("  ".join("-" * w for w in widths))
            reasons = defaultdict(list)
            for o in st.ops:
                if o.path == "simulated" and o.why:
                    reasons[o.why].append(o.op)
            for why, names in reasons.items():
                lines.append(f"simulated ({', '.join(names)}): {why}")
            other = st.step_s - st.ops_s
            lines.append(f"outside compute ops (normalization, activations, data movement; the plain step minus the "
                         f"instrumented ops' sum): {_ms(other)} ms" if other > 0 else
                         "the instrumented ops' sum exceeds the plain step (the marks' copies and the interpreter's "
                         "overhead count in it)")
        return "\n".join(lines)


def _fp32_baseline(work: nn.Module) -> nn.Module:
    """A copy of the benched model whose quantizers all pass their tensors through: the same graph in FP32
    (native calls then run their simulated group, i.e. the plain ops), the step's baseline. Gates, where
    the plan has them, still run and choose."""
    from fracpass.quant import FULL_PRECISION, Quantizer

    baseline = copy.deepcopy(work)
    for module in baseline.modules():
        if isinstance(module, Quantizer):
            module.pass_through(FULL_PRECISION)
    return baseline


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 1e-2 else f"{seconds * 1e3:.1f}"


# -- marks -----------------------------------------------------------------------------------------
class _Mark(torch.autograd.Function):
    """Identity (a copy) whose backward records when the gradient reached it."""

    @staticmethod
    def forward(ctx, x, log, key):  # type: ignore[override]
        ctx.log, ctx.key = log, key
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ctx.log[ctx.key].append(time.perf_counter())
        return grad, None, None


def _mark(value: Any, log, key) -> Any:
    if isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point():
        return _Mark.apply(value, log, key)
    return value


class _Timed(torch.fx.Interpreter):
    """Runs the graph node by node, timing each op group's forward and marking its boundary."""

    def __init__(self, gm: torch.fx.GraphModule, member: Dict[str, str]):
        super().__init__(gm)
        self.member = member
        self.forward_s: Dict[str, float] = defaultdict(float)
        self.marks: Dict[Tuple[str, str], List[float]] = defaultdict(list)

    def run_node(self, n: torch.fx.Node) -> Any:
        op = self.member.get(n.name)
        if op is None:
            return super().run_node(n)
        with self._set_current_node(n):
            args = map_arg(n.args, lambda a: self._enter(op, a))
            kwargs = map_arg(n.kwargs, lambda a: self._enter(op, a))
            start = time.perf_counter()
            out = getattr(self, n.op)(n.target, args, kwargs)
            self.forward_s[op] += time.perf_counter() - start
        if any(self.member.get(u.name) != op for u in n.users):
            out = torch.utils._pytree.tree_map(lambda v: _mark(v, self.marks, (op, "out")), out)
        return out

    def _enter(self, op: str, a: torch.fx.Node) -> Any:
        value = self.env[a]
        if self.member.get(a.name) == op:
            return value
        return torch.utils._pytree.tree_map(lambda v: _mark(v, self.marks, (op, "in")), value)


def _groups(gm: torch.fx.GraphModule, ops: Sequence[str]) -> Dict[str, str]:
    """node name -> the compute op whose group it belongs to (the op and the quantizers inserted for it)."""
    member = {op: op for op in ops}
    for node in gm.graph.nodes:
        info = meta.inserted(node)
        if info is not None and info.role in _ROLES and info.source in member and node.op != "get_attr":
            member[node.name] = info.source
    return member


# -- loss ------------------------------------------------------------------------------------------
def _sum_loss(out: Any) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise FracpassError("bench: the model's output holds no floating tensor that needs a gradient, so there is "
                            "no backward to time; pass loss_fn= to turn the output into a scalar loss")
    return sum(t.float().sum() for t in leaves)


# -- prediction ------------------------------------------------------------------------------------
def _predict(op_cost, stage: int, runs_on: Tuple[str, ...], target) -> Tuple[float, float, float, float]:
    """(as run, at bits, as run forward, at bits forward) in seconds for one op at ``stage``."""
    from fracpass.costreport import is_zero

    at_bits = op_cost.products(stage)
    fp32 = op_cost.products(None)
    lat = lambda p: target.latency_s(p[1], p[4], p[2], p[3])
    bits_total = sum(lat(p) for p in at_bits)
    bits_fwd = lat(at_bits[0])
    # runs_on: forward, then one entry per operand; the products list only operands with a gradient
    per_product = [runs_on[0]] + [runs_on[1 + i] for i, m in enumerate(op_cost.backward_macs) if not is_zero(m)]
    bf16 = lambda f: (f[0], f[1], 16, 16, f[4] / 2)  # 16-bit operands, half fp32's bytes
    if op_cost.mix:  # gated: simulated (every product in fp32), or convolutions on bf16 with per-sample scales
        # samples whose gradient option exceeds 8 bits run their backward products in fp32
        wide = sum(share for share, a, g in op_cost.mix if a and g > 8)
        run_s = [lat(bf16(f)) if how == "bf16" and i == 0 else
                 (1 - wide) * lat(bf16(f)) + wide * lat(f) if how == "bf16" else lat(f)
                 for i, (f, how) in enumerate(zip(fp32, per_product))]
        return sum(run_s), bits_total, run_s[0], bits_fwd
    # int8, fp8: the product at its bits; bf16: 16-bit operands (half fp32's bytes); fp32: at 32 bits
    run = [b if how in ("int8", "fp8") else bf16(f) if how == "bf16" else f for b, f, how in zip(at_bits, fp32, per_product)]
    return sum(lat(p) for p in run), bits_total, lat(run[0]), bits_fwd


# -- entry point -----------------------------------------------------------------------------------
def bench(qmodel: nn.Module, example_inputs: Sequence[Any] = (), example_kwargs: Optional[Dict[str, Any]] = None, *,
          target: Any = "epyc9655", stages: Optional[Sequence[int]] = None, repeats: int = 5, warmup: int = 2,
          threads: Optional[int] = None, loss_fn: Optional[Callable[[Any], torch.Tensor]] = None,
          progress: Optional[Callable[[str], None]] = None) -> BenchReport:
    """Time forward + backward per stage and per compute op, beside the profile's predicted latency.

    ``target``: a cpu profile with a core count (``targets/epyc9655.toml``), scaled to ``threads``
    cores (default: ``torch.get_num_threads()``); ``stages``: default every stage of the plan;
    ``loss_fn``: output -> scalar (default: the sum of the output's floating tensors).
    """
    from fracpass.api import example_args, stage_text, cost, set_stage
    from fracpass.state import model_state
    from fracpass.costing import flat_inputs
    from fracpass.native import op_paths, product_paths
    from fracpass.targets import load_target

    if repeats < 1 or warmup < 0:
        raise FracpassError(f"bench: repeats={repeats}, warmup={warmup}: need repeats >= 1 and warmup >= 0")
    state = model_state(qmodel)
    args, kwargs = example_args(state, example_inputs, example_kwargs)
    if not args and not kwargs:
        raise FracpassError("bench: no example inputs; pass example_inputs=(x,) (a batch to time the step on)")
    used = threads or torch.get_num_threads()
    profile = load_target(target)
    scaled = profile.per_cores(used)
    num = state.plan.num_stages
    wanted = list(range(num)) if stages is None else [s if s >= 0 else num + s for s in stages]
    bad = [s for s, w in zip(stages or wanted, wanted) if not 0 <= w < num]
    if bad:
        raise FracpassError(f"bench: stages {bad} do not exist; the plan has {num} stage(s) (0..{num - 1}, or -1 for "
                            "the last)")
    loss_fn = loss_fn or _sum_loss
    batch = next((a.shape[0] for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.dim() > 0), 0)

    work = copy.deepcopy(qmodel)  # the user's model keeps its ranges, stage and gradients
    work.train()
    prior_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    results = []
    try:
        with torch.random.fork_rng(devices=[]):
            for stage in wanted:
                set_stage(work, stage)
                report = cost(work, args, kwargs, stage=stage)
                ops = [o.op for o in report.ops]
                member = _groups(work, ops)

                baseline = _fp32_baseline(work)

                def plain(model=work):
                    loss_fn(model(*args, **kwargs)).backward()
                    model.zero_grad(set_to_none=True)

                for _ in range(warmup):
                    plain()
                    plain(baseline)
                steps, fp32_steps = [], []
                for r in range(repeats):  # interleaved, each repeat starting with the other one
                    for model, times in ((work, steps), (baseline, fp32_steps))[::1 if r % 2 == 0 else -1]:
                        start = time.perf_counter()
                        plain(model)
                        times.append(time.perf_counter() - start)
                del baseline
                # after a call on these inputs: a path that depends on the operands' sizes (MIN_INTENSITY,
                # MIN_CONV_MACS) is the one this batch took
                runs = product_paths(work)
                paths = op_paths(work)
                fwd: Dict[str, List[float]] = defaultdict(list)
                bwd: Dict[str, List[float]] = defaultdict(list)
                for _ in range(repeats):
                    timed = _Timed(work, member)
                    # Interpreter.run takes the graph's flat inputs (keywords and defaults placed as cost does)
                    flat = timed.run(*flat_inputs(work, args, kwargs), enable_io_processing=False)
                    out = work.graph._codegen.process_outputs(flat)
                    loss_fn(out).backward()
                    work.zero_grad(set_to_none=True)
                    for op in ops:
                        fwd[op].append(timed.forward_s.get(op, 0.0))
                        ins, outs = timed.marks.get((op, "in")), timed.marks.get((op, "out"))
                        if ins and outs:
                            bwd[op].append(max(ins) - min(outs))
                timings = []
                for o in report.ops:
                    path, why = paths.get(o.op, ("fp32", "")) if o.excluded == "" else ("fp32", o.excluded)
                    runs_on = runs.get(o.op, ("fp32",) * (1 + len(o.backward_macs)))  # forward, then per operand
                    as_run, at_bits, as_run_f, at_bits_f = _predict(o, stage, runs_on, scaled)
                    timings.append(OpTiming(o.op, o.kind, path, runs_on, statistics.median(fwd[o.op]),
                                            statistics.median(bwd[o.op]) if bwd[o.op] else None, as_run, at_bits, as_run_f,
                                            at_bits_f, why or ""))
                results.append(StageBench(stage, stage_text(state.plan, stage), statistics.median(steps), (min(steps), max(steps)),
                                          tuple(timings), statistics.median(fp32_steps)))
                if progress is not None:
                    progress(f"stage {stage}: step {_ms(statistics.median(steps))} ms")
    finally:
        torch.set_num_threads(prior_threads)
    return BenchReport(scaled.name, used, state.execution, batch, repeats, tuple(results))

