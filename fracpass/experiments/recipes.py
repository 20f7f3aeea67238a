"""The training recipes compared, and the settings every recipe of one data set shares.

Every recipe trains the same network with the same iterations, optimiser, learning-rate schedule,
data order and seeds; only the plan differs. The classifier stays at full precision in every
quantized recipe, as in FracTrain's code (its BitOPs count leaves it out: see
``fracpass.experiments.accounting``). The stem is a choice, ``Config.stem``:

* ``"fp32"``: the stem at full precision in every recipe (and out of the paper's BitOPs count). That
  is what FracTrain's gated ResNets do (``conv1(x, 0, 0)``); the digits and MNIST-5k results used it.
* ``"stage-bits"``: static and PFQ recipes quantize the stem at the stage's bits, as FracTrain's
  plain ResNet does (``conv3x3(3, 16, fix_prec=True)`` called with the stage's ``num_bits``), which
  its static and PFQ training scripts run; DFQ and FracTrain keep it at full precision, as the gated
  ResNets do. The paper's count then includes the stem for static and PFQ recipes only (about 0.4 %
  of ResNet-20's MACs on 28x28 images), as each of the authors' scripts counts.

With projection shortcuts (``Config.shortcut = "proj"``) the 1x1 shortcut convolutions are quantized
at the stage's bits in static and PFQ recipes (the authors' ``fix_prec`` ``QConv2d``); in gated
recipes, where no gate covers them, at the gates' weight bits and their most precise option.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import fracpass
from fracpass.errors import FracpassError

__all__ = ["Config", "Recipe", "RECIPES", "DEMO_RECIPES", "CONFIGS", "config_for", "plan_for", "gate_targets",
           "EXCLUDE", "LADDER", "STEMS", "exclusions", "describe_setup"]

log = logging.getLogger("fracpass.experiments")

EXCLUDE = ("conv1", "fc")  # stem and classifier at full precision (FracTrain's gated code does the same)
STEMS = ("fp32", "stage-bits")
LR_SCHEDULES = ("cosine", "piecewise")
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
    shortcut: str = "pad"  # "proj": 1x1 conv + BN where a block changes shape (the authors'); see model.py
    stem: str = "fp32"  # or "stage-bits" (static and PFQ quantize the stem; see the module docstring)
    lr_schedule: str = "cosine"  # to zero; "piecewise": x0.1 at 50 % and 75 % of the run (FracTrain's 32k/48k of 64k)
    execution: str = "simulate"  # fracpass.transform's execution: "simulate" or "native"

    def __post_init__(self) -> None:
        from fracpass.experiments.model import SHORTCUTS

        for name, allowed in (("shortcut", SHORTCUTS), ("stem", STEMS), ("lr_schedule", LR_SCHEDULES),
                              ("execution", ("simulate", "native"))):
            if getattr(self, name) not in allowed:
                raise FracpassError(f"Config.{name} = {getattr(self, name)!r}: use one of {', '.join(allowed)}")

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
    # 55,000 training images (5,000 held out for validation), batch 128: 429 iterations per epoch; 20 epochs,
    # evaluated (validation and test) once an epoch. Plateau windows of a quarter epoch (107 iterations): 80
    # windows over the run, near the 164 one-epoch windows of FracTrain's 64,000-iteration CIFAR runs, where
    # one-epoch windows would give 20, too few for three switches of the 5-window rule (see
    # docs/results/fashion-mnist/PLAN.md). FracTrain's ResNet-20 with projection shortcuts, the stem at the
    # stage bits, SGD lr 0.1 momentum 0.9 wd 1e-4, the lr x0.1 at 50 % and 75 % of the run; the README's gate
    # targets: DFQ 3 %, FracTrain 1.5 % stepped by 0.5 % (1.5 % lies below the cheapest option, 54/3072 = 1.76 %,
    # in the authors' accounting too: every sample takes it in stage 0, and the build warns so)
    "fashion-mnist": Config("fashion-mnist", iterations=20 * 429, batch_size=128, lr=0.1, weight_decay=1e-4,
                            dfq_target=3.0, fractrain_targets=(1.5, 2.0, 2.5, 3.0),
                            eval_every=429, plateau_every=429 // 4, blocks=3, shortcut="proj", stem="stage-bits",
                            lr_schedule="piecewise"),
}
# --quick: the same recipes and rules for a few dozen iterations, windows scaled down to match
QUICK = {"digits": dict(iterations=60, eval_every=20, plateau_every=3, plateau_window=3, scale_windows=3),
         "mnist5k": dict(iterations=30, eval_every=15, plateau_every=2, plateau_window=3, scale_windows=3),
         "cifar10-dir": dict(iterations=100, eval_every=50, plateau_every=5, plateau_window=3, scale_windows=3,
                             blocks=1),
         # on a tiny slice of the data (see QUICK_SLICE): the full model, a few iterations of batch 32
         "fashion-mnist": dict(iterations=12, batch_size=32, eval_every=6, plateau_every=1, plateau_window=2,
                               scale_windows=2)}
QUICK_SLICE = {"fashion-mnist": (512, 128, 128)}  # --quick: training / validation / test images kept


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


def exclusions(cfg: Config, gated: bool) -> Tuple[str, ...]:
    """The module paths a recipe leaves at full precision (and out of the paper's count)."""
    return EXCLUDE if gated or cfg.stem == "fp32" else ("fc",)


def describe_setup(cfg: Config) -> str:
    """The model, stem and shortcut choices in words, for tables and logs."""
    shortcut = {"proj": "1x1 conv + BN projection shortcuts", "pad": "parameter-free (zero-pad) shortcuts"}[cfg.shortcut]
    stem = {"fp32": "stem FP32 in every recipe",
            "stage-bits": "stem at the stage bits in static and PFQ recipes, FP32 in gated ones"}[cfg.stem]
    return f"ResNet-{6 * cfg.blocks + 2} width {cfg.width}, {shortcut}, {stem}, classifier FP32"


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
        return fracpass.Plan.static(*bits, exclude=exclusions(cfg, gated=False))
    if name == "pfq":
        return fracpass.Plan.progressive(fw=LADDER[0], bw=LADDER[1], exclude=exclusions(cfg, gated=False),
                                         switch=_plateau(cfg))
    a, g, w = GATE_OPTIONS
    rules = fracpass.Plan.static(exclude=exclusions(cfg, gated=True)).rules
    if cfg.shortcut == "proj":  # no gate covers a shortcut: pin it where the gates' most precise option runs
        rules += (fracpass.Rule(match="*.shortcut", w=w, a=max(a), g=max(g),
                                reason="projection shortcut: the gates' w and most precise option"),)
    if name == "dfq":
        gates = fracpass.Gates(a=a, g=g, w=w, target=cfg.dfq_target, beta=cfg.beta)
        return fracpass.Plan(stages=(fracpass.Stage(w=w, a=max(a), g=max(g)),), rules=rules, gates=gates)
    preset = fracpass.Plan.fractrain("cifar")  # the library's full method, with this data set's targets and windows
    gates = dataclasses.replace(preset.gates, a=a, g=g, w=w, target=tuple(cfg.fractrain_targets), beta=cfg.beta)
    return dataclasses.replace(preset, stages=(preset.stages[0],) * len(cfg.fractrain_targets), rules=rules,
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
