"""The cost report: per-op MACs and bits, BitOPs per stage, energy and latency on a target,
whole-schedule totals and symbolic counts. Built by ``fracpass.costing.analyze``."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import sympy

from fracpass.errors import FracpassError
from fracpass.quant import FULL_PRECISION

__all__ = ["CATEGORIES", "OpCost", "CostReport", "TrainingTotals", "Macs", "GateCost", "relative_cost"]

CATEGORIES = ("forward", "backward_error", "backward_weight")


def relative_cost(a: int, w: int, g: int) -> float:
    """FracTrain's relative cost of one op to FP32: (a*w + g*w + g*a) / (3 * 32^2)."""
    return (a * w + g * w + g * a) / (3 * 32 * 32)


@dataclass(frozen=True)
class OpCost:
    """One compute op's MACs (per batch of the example inputs) and bits."""

    op: str
    kind: str
    module: str
    roles: Tuple[str, ...]  # per operand: "act" or "weight"
    forward_macs: Any
    backward_macs: Tuple[Any, ...]  # per operand; 0 where the operand needs no gradient
    operand_elems: Tuple[Any, ...]
    out_elems: Any
    w: Tuple[int, ...]  # bits per stage (32 where excluded)
    a: Tuple[int, ...]
    g: Tuple[int, ...]
    excluded: str = ""
    gated: str = ""  # the gated unit the op belongs to
    mix: Tuple[Tuple[float, int, int], ...] = ()  # gated: (share of samples, a, g) per option; a = 0 skips

    def products(self, stage: Optional[int]) -> List[Tuple[str, Any, int, int, Any]]:
        """(category, MACs, bits x, bits y, bytes moved) of each product; stage None = FP32.

        A gated op with a measured ``mix`` gives each option's products, MACs scaled by its share."""
        if self.mix and stage is not None:
            out = []
            for share, a, g in self.mix:
                if a == 0 or share == 0:
                    continue
                one = OpCost(self.op, self.kind, self.module, self.roles, self.forward_macs * share,
                             tuple(m * share for m in self.backward_macs), tuple(e * share for e in self.operand_elems),
                             self.out_elems * share, (self.w[stage],), (a,), (g,))
                out += one.products(0)
            return out
        b = {"act": FULL_PRECISION, "weight": FULL_PRECISION}
        g = FULL_PRECISION
        if stage is not None:
            b = {"act": self.a[stage], "weight": self.w[stage]}
            g = self.g[stage]
        bits = [b[r] for r in self.roles]
        other = [bits[1 - i] if len(bits) == 2 else b["act"] for i in range(len(bits))]
        out = [("forward", self.forward_macs, bits[0], bits[1] if len(bits) > 1 else bits[0],
                sum(e * bb / 8 for e, bb in zip(self.operand_elems, bits)) + self.out_elems * 4)]
        for i, macs in enumerate(self.backward_macs):
            if is_zero(macs):
                continue
            category = "backward_weight" if self.roles[i] == "weight" else "backward_error"
            nbytes = self.out_elems * g / 8 + self.operand_elems[1 - i if len(bits) == 2 else 0] * other[i] / 8 \
                + self.operand_elems[i] * 4
            out.append((category, macs, g, other[i], nbytes))
        return out


def is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == 0


@dataclass(frozen=True)
class TrainingTotals:
    """A whole schedule: per stage and in total, with the static (last-stage) plan for comparison."""

    steps_per_stage: Tuple[int, ...]
    batch_size: int
    bitops: float
    static_bitops: float
    energy_j: Optional[float]
    static_energy_j: Optional[float]
    latency_s: Optional[float]
    static_latency_s: Optional[float]

    @property
    def bitops_saving(self) -> float:
        return 1.0 - self.bitops / self.static_bitops

    @property
    def latency_saving(self) -> Optional[float]:
        return None if self.latency_s is None else 1.0 - self.latency_s / self.static_latency_s

    def __str__(self) -> str:
        lines = [f"training: {sum(self.steps_per_stage)} steps (per stage {list(self.steps_per_stage)}), "
                 f"batch {self.batch_size}",
                 f"  BitOPs   {self.bitops:.3e}  vs static last stage {self.static_bitops:.3e}  "
                 f"({100 * self.bitops_saving:.1f}% less)"]
        if self.latency_s is not None:
            lines.append(f"  latency  {self.latency_s:.3e} s vs {self.static_latency_s:.3e} s "
                         f"({100 * self.latency_saving:.1f}% less)")
            lines.append(f"  energy   {self.energy_j:.3e} J vs {self.static_energy_j:.3e} J "
                         f"({100 * (1 - self.energy_j / self.static_energy_j):.1f}% less)")
        return "\n".join(lines)


@dataclass
class CostReport:
    """MACs, BitOPs, energy and latency of a transformed model. MACs are per batch of the example
    inputs (``batch`` samples); ``per="sample"`` divides by it."""

    ops: List[OpCost]
    batch: int
    num_stages: int
    stage: int
    target: Any = None  # fracpass.targets.Target
    not_costed: List[Tuple[str, str]] = field(default_factory=list)
    _symbolic: Any = None  # callable producing symbolic OpCosts, run on first use
    _symbolic_ops: Optional[List[OpCost]] = None
    symbols: Dict[str, Any] = field(default_factory=dict)
    node_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # shapes of nodes analyze was asked to watch
    gates: Optional["GateCost"] = None  # DFQ: per-option costs of each unit and the mix they were costed with

    # -- MACs -------------------------------------------------------------------------------------
    @property
    def forward_macs(self) -> "Macs":
        return Macs(sum(o.forward_macs for o in self.ops), self.batch)

    @property
    def backward_macs(self) -> "Macs":
        return Macs(sum(sum(o.backward_macs) for o in self.ops), self.batch)

    # -- BitOPs -----------------------------------------------------------------------------------
    def _stage(self, stage: Optional[int]) -> int:
        stage = self.stage if stage is None else stage
        if not -self.num_stages <= stage < self.num_stages:
            raise FracpassError(f"stage {stage} is out of range; the plan has {self.num_stages} stage(s)")
        return stage % self.num_stages

    def bitops(self, stage: Optional[int] = None, per: str = "sample") -> Dict[str, float]:
        """{"forward", "backward_error", "backward_weight", "total"} BitOPs at ``stage``."""
        return self._bitops(self.ops, self._stage(stage), self._divisor(per))

    def fp32_bitops(self, per: str = "sample") -> Dict[str, float]:
        return self._bitops(self.ops, None, self._divisor(per))

    def _divisor(self, per: str) -> int:
        if per not in ("sample", "batch"):
            raise FracpassError(f"per={per!r}: use 'sample' or 'batch'")
        return self.batch if per == "sample" else 1

    @staticmethod
    def _bitops(ops, stage, divisor) -> Dict[str, Any]:
        out: Dict[str, Any] = {c: 0 for c in CATEGORIES}
        for op in ops:
            for category, macs, bx, by, _ in op.products(stage):
                out[category] += macs * bx * by
        out["total"] = sum(out[c] for c in CATEGORIES)
        return out if divisor == 1 else {k: v / divisor for k, v in out.items()}  # per batch stays exact

    def relative_to_fp32(self, stage: Optional[int] = None) -> float:
        """FracTrain's "cp": BitOPs relative to the same products at 32 x 32 bits (8/8 -> 1/16)."""
        return self.bitops(stage)["total"] / self.fp32_bitops()["total"]

    # -- target -----------------------------------------------------------------------------------
    def _need_target(self):
        if self.target is None:
            raise FracpassError("this report has no hardware target; pass target='bitfusion' (or 'a100', 'h100', "
                                "'xeon8380', 'epyc9655', or a profile path) to fracpass.cost()")
        return self.target

    def latency_s(self, stage: Optional[int] = None, batch_size: Optional[int] = None) -> float:
        """One training step (forward + backward) at the example batch (or ``batch_size``)."""
        return self._on_target(self._stage(stage), batch_size)[0]

    def energy_j(self, stage: Optional[int] = None, batch_size: Optional[int] = None) -> float:
        return self._on_target(self._stage(stage), batch_size)[1]

    def _on_target(self, stage: Optional[int], batch_size: Optional[int]) -> Tuple[float, float]:
        target = self._need_target()
        scale = 1.0 if batch_size is None else batch_size / self.batch
        latency = energy = 0.0
        for op in self.ops:
            for _, macs, bx, by, nbytes in op.products(stage):
                macs, nbytes = macs * scale, nbytes * scale  # weights move once per step: a slight overestimate
                latency += target.latency_s(macs, nbytes, bx, by)
                energy += target.energy_j(macs, nbytes, bx, by)
        return latency, energy

    def rounding(self, stage: Optional[int] = None) -> List[Tuple[str, int, int, str]]:
        """(op, bits x, bits y, precision it runs as) for every product whose bits the target rounds up."""
        target, stage = self._need_target(), self._stage(stage)
        seen = []
        for op in self.ops:
            for _, _, bx, by, _ in op.products(stage):
                rate = target.rate(bx, by)
                if rate.rounded and (op.op, bx, by, rate.precision) not in seen:
                    seen.append((op.op, bx, by, rate.precision))
        return seen

    # -- whole schedule ---------------------------------------------------------------------------
    def training(self, steps_per_stage: Sequence[int], batch_size: Optional[int] = None) -> TrainingTotals:
        steps = tuple(int(s) for s in steps_per_stage)
        if len(steps) != self.num_stages or any(s < 0 for s in steps):
            raise FracpassError(f"steps_per_stage={list(steps_per_stage)}: give one non-negative step count for each of "
                                f"the plan's {self.num_stages} stages")
        batch = batch_size or self.batch
        bitops = sum(s * self.bitops(k)["total"] * batch for k, s in enumerate(steps))
        static = sum(steps) * self.bitops(-1)["total"] * batch
        lat = en = s_lat = s_en = None
        if self.target is not None:
            per_stage = [self._on_target(k, batch) for k in range(self.num_stages)]
            lat = sum(s * p[0] for s, p in zip(steps, per_stage))
            en = sum(s * p[1] for s, p in zip(steps, per_stage))
            s_lat, s_en = sum(steps) * per_stage[-1][0], sum(steps) * per_stage[-1][1]
        return TrainingTotals(steps, batch, bitops, static, en, s_en, lat, s_lat)

    # -- symbolic ---------------------------------------------------------------------------------
    def symbolic(self, key: str = "total", stage: Optional[int] = None) -> sympy.Expr:
        """A sympy expression per batch in the input's symbols (N: batch; H, W: spatial size;
        T: sequence length) for BitOPs ``key`` ("forward", "backward_error", "backward_weight",
        "total") or MACs ("forward_macs", "backward_macs"), at ``stage``."""
        if self._symbolic_ops is None:
            self._symbolic_ops = self._symbolic()
        ops = self._symbolic_ops
        if key == "forward_macs":
            return sympy.expand(sum(o.forward_macs for o in ops))
        if key == "backward_macs":
            return sympy.expand(sum(sum(o.backward_macs) for o in ops))
        if key not in CATEGORIES + ("total",):
            raise FracpassError(f"symbolic({key!r}): use one of {CATEGORIES + ('total', 'forward_macs', 'backward_macs')}")
        return sympy.expand(self._bitops(ops, self._stage(stage), 1)[key])

    # -- presentation -----------------------------------------------------------------------------
    def rows(self, stage: Optional[int] = None) -> List[Dict[str, Any]]:
        stage = self._stage(stage)
        total = self.bitops(stage, per="batch")["total"] or 1
        rows = []
        for op in self.ops:
            products = op.products(stage)
            bitops = sum(m * bx * by for _, m, bx, by, _ in products)
            macs = {c: sum(m for cat, m, *_ in products if cat == c) for c in CATEGORIES}
            rows.append(dict(op=op.op, kind=op.kind, module=op.module, fwd_macs=int(macs["forward"]),
                             bwd_error_macs=int(macs["backward_error"]), bwd_weight_macs=int(macs["backward_weight"]),
                             w=op.w[stage], a=op.a[stage], g=op.g[stage], excluded=op.excluded, gated=op.gated,
                             bitops=float(bitops), share=float(bitops / total)))
        return rows

    @property
    def per_op(self) -> List[Dict[str, Any]]:
        return self.rows()

    def to_json(self, stage: Optional[int] = None) -> str:
        stage = self._stage(stage)
        data: Dict[str, Any] = {
            "batch": self.batch, "stage": stage, "num_stages": self.num_stages,
            "forward_macs_per_sample": self.forward_macs.per_sample, "backward_macs_per_sample": self.backward_macs.per_sample,
            "stages": [{"stage": k, "bitops_per_sample": self.bitops(k), "relative_to_fp32": self.relative_to_fp32(k)}
                       for k in range(self.num_stages)],
            "per_op": self.rows(stage), "not_costed": [{"op": n, "reason": r} for n, r in self.not_costed],
        }
        if self.gates is not None:
            data["gates"] = self.gates.to_dict()
        if self.target is not None:
            data["target"] = self.target.name
            for entry in data["stages"]:
                k = entry["stage"]
                entry["latency_s_per_step"], entry["energy_j_per_step"] = self._on_target(k, None)
            data["rounding"] = [dict(op=o, bits=[x, y], runs_as=p) for o, x, y, p in self.rounding(stage)]
        return json.dumps(data, indent=2)

    def __str__(self) -> str:
        stage = self.stage
        head = ("op", "kind", "module", "fwd MACs", "bwd err MACs", "bwd wgt MACs", "w/a/g", "BitOPs", "share")
        body = [(r["op"], r["kind"], r["module"] or "<root>", f"{r['fwd_macs']:,}", f"{r['bwd_error_macs']:,}",
                 f"{r['bwd_weight_macs']:,}", "fp32" if r["excluded"] else f"{r['w']}/gate {r['gated']}" if r["gated"]
                 else f"{r['w']}/{r['a']}/{r['g']}",
                 f"{r['bitops']:.3e}", f"{100 * r['share']:.1f}%") for r in self.rows(stage)]
        widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
        fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
        lines = [f"cost per batch of {self.batch}; stage {stage} of {self.num_stages}", fmt(head),
                 "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        lines.append(f"forward MACs per sample {self.forward_macs.per_sample:,.0f}; backward {self.backward_macs.per_sample:,.0f}")
        for k in range(self.num_stages):
            b = self.bitops(k)
            line = f"stage {k}: BitOPs/sample {b['total']:.3e} ({100 * self.relative_to_fp32(k):.2f}% of FP32)"
            if self.target is not None:
                lat, en = self._on_target(k, None)
                line += f"; {self.target.name}: {lat * 1e3:.4f} ms, {en * 1e3:.4f} mJ per step"
            lines.append(line)
        if self.target is not None:
            grouped: Dict[Tuple[int, int, str], int] = {}
            for _, bx, by, prec in self.rounding(stage):
                grouped[(bx, by, prec)] = grouped.get((bx, by, prec), 0) + 1
            for (bx, by, prec), count in grouped.items():
                lines.append(f"note: on {self.target.name}, {bx}x{by}-bit products run as {prec} ({count} ops)")
        if self.gates is not None:
            lines.append(str(self.gates))
            share = self.gates.gate_bitops_per_sample / (self.bitops(stage)["total"] or 1)
            lines.append(f"  ({100 * share:.1f}% on top of stage {stage}'s BitOPs above, which count the gated network only)")
        for name, reason in self.not_costed:
            lines.append(f"not costed: {name} ({reason})")
        return "\n".join(lines)


@dataclass(frozen=True)
class GateCost:
    """Gated units' cost per option (% of the model's FP32 training BitOPs, per sample), the mix of
    options the report costs gated ops with, where that mix came from, and the gates' own MACs."""

    options: Tuple[Tuple[int, int], ...]  # (a_k, g_k)
    unit_costs: Dict[str, Tuple[float, ...]]  # unit -> cost of each option
    mix: Dict[str, Tuple[float, ...]]  # unit -> share of samples per option
    mix_source: str  # "last training batch" or "example inputs"
    gate_macs_per_sample: int  # forward MACs of all gate branches (full precision)
    gate_bitops_per_sample: float  # their forward + backward BitOPs at 32 x 32 bits

    def expected(self, unit: str) -> float:
        return sum(p * c for p, c in zip(self.mix[unit], self.unit_costs[unit]))

    def to_dict(self) -> Dict[str, Any]:
        return {"options": [list(o) for o in self.options], "mix_source": self.mix_source,
                "gate_macs_per_sample": self.gate_macs_per_sample, "gate_bitops_per_sample": self.gate_bitops_per_sample,
                "units": [{"unit": u, "option_cost_percent": list(c), "mix": list(self.mix[u]),
                           "expected_percent": self.expected(u)} for u, c in self.unit_costs.items()]}

    def __str__(self) -> str:
        head = ["unit"] + [f"a{a}/g{g}" if a else "skip" for a, g in self.options] + ["mix-weighted"]
        rows = [[u] + [f"{c:.3f}% ({100 * p:.0f}%)" for c, p in zip(costs, self.mix[u])] + [f"{self.expected(u):.3f}%"]
                for u, costs in self.unit_costs.items()]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        lines = [f"gated units: cost per option in % of FP32 (share of samples, from the {self.mix_source})",
                 fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
        lines.append(f"gates themselves (full precision): {self.gate_macs_per_sample:,} forward MACs per sample, "
                     f"{self.gate_bitops_per_sample:.3e} BitOPs per sample with backward")
        return "\n".join(lines)


@dataclass(frozen=True)
class Macs:
    per_batch: float
    batch: int

    @property
    def per_sample(self) -> float:
        return self.per_batch / self.batch
