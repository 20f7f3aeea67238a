"""The training recipes compared, and the settings every recipe of one data set shares.

Every recipe trains the same network with the same iterations, optimiser, learning-rate schedule,
data order and seeds; only the plan differs. The stem and the classifier stay at full precision in
every quantized recipe, as in FracTrain's code (its BitOPs count leaves them out: see
``fracpass.experiments.accounting``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import fracpass
from fracpass.errors import FracpassError

__all__ = ["Config", "Recipe", "RECIPES", "DEMO_RECIPES", "CONFIGS", "config_for", "plan_for", "gate_targets",
           "EXCLUDE", "LADDER"]

log = logging.getLogger("fracpass.experiments")

EXCLUDE = ("conv1", "fc")  # stem and classifier at full precision (FracTrain's code does the same)
LADDER = ((3, 4, 6, 8), (6, 6, 8, 8))  # PFQ: forward (w = a) and gradient bits per stage
GATE_OPTIONS = ((3, 4, 4, 6, 6), (6, 6, 8, 8, 12), 4)  # Plan.fractrain("cifar"): a, g per option; w


@dataclass(frozen=True)
class Config:
    """What every recipe of a comparison shares. Gate targets are relative costs in % of FP32 in the
    paper's accounting (the quantized ops only); ``gate_targets`` converts them for the controller."""

    dataset: str
    iterations: int
    batch_size: int
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_every: int = 42  # test accuracy every this many iterations (and at the end)
    plateau_every: int = 21  # LossPlateau window length in iterations (FracTrain: one epoch's 390)
    plateau_window: int = 5  # windows compared (FracTrain: 5)
    scale_windows: int = 10  # windows averaged into the loss scale (FracTrain: 10)
    threshold: float = 0.05  # FracTrain's switch threshold
    decay: float = 0.3  # and its decay after the 1st and 2nd switch
    dfq_target: float = 3.0  # DFQ's fixed target, % of FP32 (paper's accounting)
    fractrain_targets: Tuple[float, ...] = (2.0, 2.5, 3.0, 3.5)  # FracTrain's target per stage
    beta: float = 1e-3  # gate cost regulariser weight (FracTrain's default)
    blocks: int = 1  # residual blocks per stage: ResNet-(6n+2)
    width: int = 16

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


CONFIGS: Dict[str, Config] = {
    # 1,437 training images, batch 32: 44 iterations per epoch; 840 iterations ~ 19 epochs
    "digits": Config("digits", iterations=840, batch_size=32, eval_every=42, plateau_every=21),
    # 4,000 training images, batch 64: 62 iterations per epoch; 840 iterations ~ 13.5 epochs, with
    # digits' schedule (windows of 21 iterations, 40 over the run; accuracy every 42)
    "mnist5k": Config("mnist5k", iterations=840, batch_size=64, eval_every=42, plateau_every=21),
    # 50,000 training images, batch 128: 390 iterations per epoch, FracTrain's window
    "cifar10-dir": Config("cifar10-dir", iterations=64000, batch_size=128, lr=0.1, eval_every=1950,
                          plateau_every=390, blocks=3),
}
# --quick: the same recipes and rules for a few dozen iterations, windows scaled down to match
QUICK = {"digits": dict(iterations=60, eval_every=20, plateau_every=3, plateau_window=3, scale_windows=3),
         "mnist5k": dict(iterations=30, eval_every=15, plateau_every=2, plateau_window=3, scale_windows=3),
         "cifar10-dir": dict(iterations=100, eval_every=50, plateau_every=5, plateau_window=3, scale_windows=3,
                             blocks=1)}


def config_for(dataset: str, quick: bool = False, **overrides) -> Config:
    if dataset not in CONFIGS:
        raise FracpassError(f"dataset {dataset!r}: use one of {', '.join(CONFIGS)}")
    cfg = CONFIGS[dataset]
    if quick:
        cfg = dataclasses.replace(cfg, **QUICK[dataset])
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Recipe:
    name: str
    label: str  # as in the table
    note: str


RECIPES: Tuple[Recipe, ...] = (
    Recipe("fp32", "FP32", "no quantizers"),
    Recipe("static-8/8/8", "static 8/8/8 (SBM)", "w/a/g 8/8/8 throughout: FracTrain's 8-bit baseline"),
    Recipe("static-6/8", "static 6/8", "w/a 6, g 8 throughout"),
    Recipe("static-4/6", "static 4/6", "w/a 4, g 6 throughout"),
    Recipe("pfq", "PFQ 3/4/6/8, g 6/6/8/8", "ladder stepped by LossPlateau(threshold 0.05, decay 0.3)"),
    Recipe("dfq", "DFQ (gates, fixed target)", "per-block gates over 5 (a, g) options at w4, one target"),
    Recipe("fractrain", "FracTrain (PFQ + DFQ)", "the gates' target stepped by the same LossPlateau rule"),
)
BY_NAME = {r.name: r for r in RECIPES}
DEMO_RECIPES = ("fp32", "static-8/8/8", "fractrain")


def _plateau(cfg: Config) -> fracpass.LossPlateau:
    return fracpass.LossPlateau(threshold=cfg.threshold, decay=cfg.decay, window=cfg.plateau_window,
                                eval_every=cfg.plateau_every, scale_windows=cfg.scale_windows)


def plan_for(name: str, cfg: Config) -> Optional[fracpass.Plan]:
    """The recipe's plan (None: FP32, trained without quantizers). Gated plans carry their targets
    in the paper's accounting; convert them with ``gate_targets`` once the model is known."""
    if name not in BY_NAME:
        raise FracpassError(f"recipe {name!r}: use one of {', '.join(BY_NAME)}")
    if name == "fp32":
        return None
    if name.startswith("static-"):
        bits = {"static-8/8/8": (8, 8, 8), "static-6/8": (6, 6, 8), "static-4/6": (4, 4, 6)}[name]
        return fracpass.Plan.static(*bits, exclude=EXCLUDE)
    if name == "pfq":
        return fracpass.Plan.progressive(fw=LADDER[0], bw=LADDER[1], exclude=EXCLUDE, switch=_plateau(cfg))
    a, g, w = GATE_OPTIONS
    exclusions = fracpass.Plan.static(exclude=EXCLUDE).rules
    if name == "dfq":
        gates = fracpass.Gates(a=a, g=g, w=w, target=cfg.dfq_target, beta=cfg.beta)
        return fracpass.Plan(stages=(fracpass.Stage(w=w, a=max(a), g=max(g)),), rules=exclusions, gates=gates)
    preset = fracpass.Plan.fractrain("cifar")  # the library's full method, with this data set's targets and windows
    gates = dataclasses.replace(preset.gates, a=a, g=g, w=w, target=tuple(cfg.fractrain_targets), beta=cfg.beta)
    return dataclasses.replace(preset, stages=(preset.stages[0],) * len(cfg.fractrain_targets), rules=exclusions,
                               switch=_plateau(cfg), gates=gates)


def gate_targets(plan: fracpass.Plan, report) -> Tuple[float, ...]:
    """The plan's gate targets (paper's accounting) in the controller's units, one per stage.

    The gates' controller steers the whole model's relative cost: every compute op, the
    full-precision ones at 32 bits, in % of the model's FP32 BitOPs (gates left out). A target in
    the paper's accounting (quantized ops only) t maps to (t * Q + 100 * E) / F, with Q the FP32
    BitOPs of the quantized ops, E those of the full-precision ops and F = Q + E.
    """
    quantized = sum(_fp32(op) for op in report.ops if not op.excluded)
    excluded = sum(_fp32(op) for op in report.ops if op.excluded)
    total = quantized + excluded
    paper = plan.gates.targets(plan.num_stages)
    return tuple((t * quantized + 100 * excluded) / total for t in paper)


def _fp32(op) -> float:
    return float(sum(m * bx * by for _, m, bx, by, _ in op.products(None)))


def warn_unreachable(hub, targets: Tuple[float, ...], recipe: str) -> Tuple[float, ...]:
    """Log a warning for each stage whose target lies below the cheapest mix the gates can choose;
    returns the cheapest achievable cost per stage (controller units)."""
    cheapest = []
    for k, target in enumerate(targets):
        floor = float(hub.base_costs[k]) + float(hub.unit_costs.min(1).values.sum())
        top = float(hub.base_costs[k]) + float(hub.unit_costs.max(1).values.sum())
        cheapest.append(floor)
        if target < floor or target > top:
            log.warning("%s: stage %d's gate target %.3f%% of FP32 lies outside what the gates can choose "
                        "(%.3f%% .. %.3f%%): every sample will take the %s option", recipe, k, target, floor, top,
                        "cheapest" if target < floor else "most precise")
    return tuple(cheapest)
