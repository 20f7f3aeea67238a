"""PFQ stage-switch rules: when a progressive plan moves to its next precision stage.

* ``LossPlateau`` — FracTrain's indicator. Per window of ``eval_every`` iterations the window
  loss is the mean training loss; ``scale_loss`` is the running mean of the window losses over the
  first ``scale_windows`` windows, then frozen; the last ``window`` window losses are kept, and
  when that list is full and |L_i - L_latest| / scale_loss <= threshold for every older entry,
  the stage advances, the list is cleared, and after the 1st and 2nd switch only the threshold is
  multiplied by ``decay``. Nothing switches after the last stage.
* ``AtSteps`` / ``AtEpochs`` — fixed boundaries (iterations completed before each switch).
* ``Budget`` — a training budget as a fraction of the static last-stage plan's BitOPs;
  ``fracpass.schedule`` turns it into ``AtSteps`` using the cost analysis.

Rules are frozen configuration; the mutable part lives in a ``*State`` object owned by the
``Scheduler``, which is what its ``state_dict`` saves.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from fracpass.errors import PlanError

__all__ = ["SwitchRule", "LossPlateau", "AtSteps", "AtEpochs", "Budget", "rule_from_dict"]


class SwitchRule:
    kind = ""

    def to_dict(self) -> Dict[str, Any]:
        data = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def new_state(self, num_stages: int) -> "RuleState":
        raise NotImplementedError(f"{type(self).__name__} must be resolved before training (fracpass.schedule)")


def _positive(name: str, value: Any, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise PlanError(f"{name} = {value!r}: must be a positive {'integer' if kind is int else 'number'}")


@dataclass(frozen=True)
class LossPlateau(SwitchRule):
    threshold: float = 0.05
    decay: float = 0.3
    window: int = 5
    eval_every: int = 390
    scale_windows: int = 10
    kind = "loss_plateau"

    def __post_init__(self) -> None:
        _positive("LossPlateau.threshold", self.threshold)
        _positive("LossPlateau.decay", self.decay)
        for name in ("window", "eval_every", "scale_windows"):
            _positive(f"LossPlateau.{name}", getattr(self, name), int)
        if self.window < 2:
            raise PlanError(f"LossPlateau.window = {self.window}: needs at least 2 window losses to compare")

    def new_state(self, num_stages: int) -> "PlateauState":
        return PlateauState(threshold=self.threshold)


@dataclass(frozen=True)
class AtSteps(SwitchRule):
    steps: Tuple[int, ...] = ()
    kind = "at_steps"

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        for s in steps:
            _positive("AtSteps.steps[...]", s, int)
        if list(steps) != sorted(set(steps)):
            raise PlanError(f"AtSteps.steps = {list(steps)}: boundaries must be strictly increasing")
        object.__setattr__(self, "steps", steps)

    def boundaries(self) -> Tuple[int, ...]:
        return self.steps

    def new_state(self, num_stages: int) -> "FixedState":
        if len(self.boundaries()) != num_stages - 1:
            raise PlanError(f"{type(self).__name__}: {len(self.boundaries())} boundaries for a plan of {num_stages} "
                            f"stages; give {num_stages - 1} (one per switch)")
        return FixedState()


@dataclass(frozen=True)
class AtEpochs(AtSteps):
    epochs: Tuple[int, ...] = ()
    steps_per_epoch: int = 0
    kind = "at_epochs"

    def __post_init__(self) -> None:
        _positive("AtEpochs.steps_per_epoch", self.steps_per_epoch, int)
        object.__setattr__(self, "epochs", tuple(self.epochs))
        object.__setattr__(self, "steps", tuple(e * self.steps_per_epoch for e in self.epochs))
        super().__post_init__()

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "epochs": list(self.epochs), "steps_per_epoch": self.steps_per_epoch}


@dataclass(frozen=True)
class Budget(SwitchRule):
    fraction: float = 0.35  # of the static last-stage plan's training BitOPs
    total_steps: int = 64000
    granularity: int = 390  # boundaries are multiples of this (a LossPlateau window by default)
    kind = "budget"

    def __post_init__(self) -> None:
        _positive("Budget.fraction", self.fraction)
        if self.fraction > 1:
            raise PlanError(f"budget = {self.fraction}: a fraction of the static plan's BitOPs, at most 1")
        _positive("Budget.total_steps", self.total_steps, int)
        _positive("Budget.granularity", self.granularity, int)


RULES = {r.kind: r for r in (LossPlateau, AtSteps, AtEpochs, Budget)}


def rule_from_dict(data: Dict[str, Any], source: str) -> SwitchRule:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in RULES:
        raise PlanError(f"{source}: [switch] kind = {kind!r}; use one of {sorted(RULES)}")
    cls = RULES[kind]
    names = {f.name for f in fields(cls)} - ({"steps"} if cls is AtEpochs else set())
    unknown = sorted(set(data) - names)
    if unknown:
        raise PlanError(f"{source}: [switch] ({kind}) has unknown key(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    except PlanError as e:
        raise PlanError(f"{source}: [switch]: {e}") from e


# -- runtime state ----------------------------------------------------------------------------------
@dataclass
class RuleState:
    def end_of_window(self, rule, iteration: int) -> bool:
        return False

    def decide(self, rule, iteration: int, window_loss: Optional[float], stage: int, last: int) -> Optional[str]:
        raise NotImplementedError


@dataclass
class FixedState(RuleState):
    def decide(self, rule: AtSteps, iteration, window_loss, stage, last) -> Optional[str]:
        bounds = rule.boundaries()
        if stage < last and iteration >= bounds[stage]:
            return f"reached step {bounds[stage]}"
        return None


@dataclass
class PlateauState(RuleState):
    threshold: float
    windows_seen: int = 0
    scale_sum: float = 0.0
    scale_loss: Optional[float] = None
    recent: List[float] = field(default_factory=list)
    switches: int = 0

    def end_of_window(self, rule: LossPlateau, iteration: int) -> bool:
        return iteration % rule.eval_every == 0

    def decide(self, rule: LossPlateau, iteration, window_loss, stage, last) -> Optional[str]:
        if window_loss is None:
            return None
        self.windows_seen += 1
        if self.windows_seen <= rule.scale_windows:
            self.scale_sum += window_loss
            self.scale_loss = self.scale_sum / self.windows_seen
        self.recent.append(window_loss)
        del self.recent[:-rule.window]
        if stage >= last or len(self.recent) < rule.window:
            return None
        latest = self.recent[-1]
        spreads = [abs(old - latest) / self.scale_loss for old in self.recent[:-1]]
        if max(spreads) > self.threshold:
            return None
        reason = (f"loss plateau: last {rule.window} window losses within {self.threshold:.4g} x scale "
                  f"{self.scale_loss:.4g} (max spread {max(spreads):.4g})")
        self.switches += 1
        if self.switches <= 2:
            self.threshold *= rule.decay
        self.recent.clear()
        return reason

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)
