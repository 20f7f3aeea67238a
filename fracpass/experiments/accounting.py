"""Training cost of a run, batch by batch, from fracpass's cost pass.

``Accounting.from_model`` asks ``fracpass.cost`` once for the network's per-op MACs and bits, and
splits them into per-sample cost vectors: the ops outside gated units at each stage, each gated
unit at each of its options, and the gate branches. A training step then costs

    batch x (ungated ops at the step's stage) + sum over units and options of
    (samples that chose the option in this batch) x (the unit at that option) [+ batch x gates]

which is what the cost pass gives for that batch's measured option mix (products are linear in
each option's share of samples), summed over the run's stage history and gate choices.

Two accountings, side by side:

* ``paper``: FracTrain's, as its code counts — the quantized compute ops only. The full-precision
  ops (the classifier; the stem, unless ``Config.stem = "stage-bits"`` quantizes it in static and
  PFQ recipes), BatchNorm and the gates are left out. Static 8/8/8 costs exactly 1/16 of FP32
  here; with the stem left out, the 3/6 stage 45/3072 = 0.01465 (a quantized stem has no error
  backward, its input being the data, so it shifts the other stages' ratios slightly).
* ``whole``: every compute op, the full-precision ones at 32 x 32 bits, plus the gates' own
  forward and backward MACs at 32 x 32 bits.

Energy and latency (per target profile) are the whole model's: the cost pass's roofline for the
compute ops, and for the gate branches their MACs at 32 x 32 bits with no memory traffic counted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import fracpass
from fracpass.costreport import CostReport, OpCost
from fracpass.quant import FULL_PRECISION
from fracpass.targets import available_targets, load_target

__all__ = ["Accounting", "PAPER", "WHOLE"]

PAPER, WHOLE = 0, 1  # indices into a cost vector; then latency per target, then energy per target


@dataclass
class Accounting:
    """Per-sample cost vectors: [paper BitOPs, whole BitOPs, latency_s per target..., energy_j per target...]."""

    targets: Tuple[str, ...]
    fp32: np.ndarray  # (V,): every op at 32 bits (the FP32 run's cost per sample; gates none)
    stage: np.ndarray  # (S, V): ops outside gated units, at each stage
    unit_option: np.ndarray  # (U, K, V): each gated unit at each option (all zeros without gates)
    gates: np.ndarray  # (V,): the gate branches
    units: Tuple[str, ...] = ()
    options: Tuple[Tuple[int, int], ...] = ()

    @property
    def size(self) -> int:
        return 2 + 2 * len(self.targets)

    def latency_index(self, target: str) -> int:
        return 2 + self.targets.index(target)

    def energy_index(self, target: str) -> int:
        return 2 + len(self.targets) + self.targets.index(target)

    @classmethod
    def from_model(cls, qmodel, example: torch.Tensor, targets: Sequence[str] = ()) -> "Accounting":
        """Cost ``qmodel`` (a transformed model) on ``example`` (one batch) with the cost pass."""
        targets = tuple(targets) or tuple(available_targets())
        report = fracpass.cost(qmodel, example_inputs=(example,))
        loaded = [load_target(t) for t in targets]
        n = report.num_stages
        gated = [op for op in report.ops if op.gated]
        plain = [op for op in report.ops if not op.gated]
        vec = lambda ops, stage: _vector(ops, stage, report, loaded)
        fp32_ops = [dataclasses.replace(op, w=(FULL_PRECISION,) * n, a=(FULL_PRECISION,) * n,
                                        g=(FULL_PRECISION,) * n, mix=()) for op in report.ops]
        fp32 = vec(fp32_ops, 0)
        stage = np.stack([vec(plain, k) for k in range(n)])
        units: Tuple[str, ...] = ()
        options: Tuple[Tuple[int, int], ...] = ()
        gates = np.zeros(2 + 2 * len(targets))
        if report.gates is not None:
            units, options = tuple(report.gates.unit_costs), tuple(report.gates.options)
            unit_option = np.zeros((len(units), len(options), gates.size))
            for u, unit in enumerate(units):
                ops = [op for op in gated if op.gated == unit]
                for k, (a, g) in enumerate(options):
                    # one option for every sample; the ops' w bits do not change with the stage here
                    unit_option[u, k] = vec([dataclasses.replace(op, mix=((1.0, a, g),)) for op in ops], 0)
            macs = 3 * report.gates.gate_macs_per_sample  # forward and both backward products
            gates[WHOLE] = report.gates.gate_bitops_per_sample
            for i, t in enumerate(loaded):
                gates[2 + i] = t.latency_s(macs, 0.0, FULL_PRECISION, FULL_PRECISION)
                gates[2 + len(loaded) + i] = t.energy_j(macs, 0.0, FULL_PRECISION, FULL_PRECISION)
        else:
            unit_option = np.zeros((0, 0, gates.size))
        return cls(targets, fp32, stage, unit_option, gates, units, options)

    def step(self, stage: int, batch: int, counts: Optional[np.ndarray] = None) -> np.ndarray:
        """Cost of one training step: ``batch`` samples at ``stage``; ``counts`` (U, K): how many of them
        chose each option in each gated unit."""
        cost = batch * self.stage[stage]
        if self.units:
            if counts is None:
                raise ValueError("a gated model's step needs the batch's option counts per unit")
            cost = cost + np.einsum("uk,ukv->v", np.asarray(counts, dtype=np.float64), self.unit_option)
            cost = cost + batch * self.gates
        return cost

    def steps(self, stages: Sequence[int], batch: int, counts: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
        """(T, V): the cost of each step of a run."""
        return np.stack([self.step(s, batch, None if counts is None else counts[t]) for t, s in enumerate(stages)])

    def fp32_steps(self, steps: int, batch: int) -> np.ndarray:
        return np.repeat((batch * self.fp32)[None], steps, axis=0)


def _vector(ops: List[OpCost], stage: int, report: CostReport, targets) -> np.ndarray:
    """Per-sample [paper BitOPs, whole BitOPs, latency per target, energy per target] of ``ops`` at ``stage``."""
    out = np.zeros(2 + 2 * len(targets))
    if not ops:
        return out
    for op in ops:
        bitops = sum(m * bx * by for _, m, bx, by, _ in op.products(stage))
        out[WHOLE] += bitops
        if not op.excluded:
            out[PAPER] += bitops
    for i, t in enumerate(targets):
        sub = CostReport(list(ops), report.batch, report.num_stages, stage, t)
        out[2 + i] = sub.latency_s(stage, batch_size=1)
        out[2 + len(targets) + i] = sub.energy_j(stage, batch_size=1)
    out[:2] /= report.batch
    return out
