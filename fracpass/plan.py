"""Precision plans: a ladder of stages plus ordered per-op rules, and the QSpec they resolve to.

A plan is data. ``Plan.static`` and ``Plan.progressive`` build the common ones; ``Plan.load`` and
``Plan.save`` round-trip it through TOML::

    format = 1

    [[stages]]          # one table per PFQ stage, lowest precision first
    w = 3               # weight bits
    a = 3               # activation bits
    g = 6               # gradient bits, 2..32 (32 = not quantized, for any role; w and a take 1..32)

    [[rules]]           # ordered; for each role the last matching rule wins
    match = "conv1"     # glob on the module path; a module also matches everything under it
    exclude = true
    reason = "stem kept at full precision"

    [[rules]]
    kind = "depthwise"  # glob on the op kind ("conv2d", "linear", "matmul", ...) or a trait
    w = 8               # an int for every stage, or a list with one entry per stage
    g = 16

    [gates]             # optional: DFQ gates pick (a_k, g_k) per sample (see fracpass.Gates)
    a = [3, 4, 4, 6, 6]
    g = [6, 6, 8, 8, 12]
    w = 4
    granularity = "block"
    target = [1.5, 2.0, 2.5, 3.0]   # one per stage, or a single number
    beta = 0.001
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

from fracpass._toml import read_toml, toml_table
from fracpass.errors import PlanError
from fracpass.quant import FULL_PRECISION
from fracpass.switch import AtSteps, Budget, LossPlateau, SwitchRule, rule_from_dict

__all__ = ["Stage", "Rule", "Plan", "QSpec", "Gates", "FORMAT_VERSION"]

FORMAT_VERSION = 1
ROLES = ("w", "a", "g")
_ROLE_NAMES = {"w": "weight", "a": "act", "g": "grad"}

BitsLike = Union[int, Sequence[int], None]


MIN_GRAD_BITS = 2


def _check_bits(where: str, value: Any, role: str = "") -> int:
    """``value`` as bits of ``role`` ("g": gradients, which need at least 2; else 1..32)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{where} = {value!r}: bits must be an integer from 1 to 32 (32 = not quantized)")
    if role == "g" and value < MIN_GRAD_BITS and value >= 1:
        # measured: ResNet-20's step-1 gradient norm is 3.07 at g=8, 4.3e4 at g=2 and 5.9e13 at g=1
        raise PlanError(f"{where} = {value}: gradient bits must be from {MIN_GRAD_BITS} to 32 (32 = not quantized); "
                        "1-bit stochastic rounding turns every gradient entry into its tensor's min or max, and that "
                        "variance compounds layer by layer until the gradient norm overflows; use g >= 6 as "
                        "FracTrain does")
    if not 1 <= value <= FULL_PRECISION:
        grad = f"; gradients need at least {MIN_GRAD_BITS}" if role == "g" else ""
        raise PlanError(f"{where} = {value}: bits must be from 1 to 32 (32 = not quantized){grad}")
    return value


WEIGHT_SCALES = ("channel", "tensor")


@dataclass(frozen=True)
class Stage:
    """Bits of each role in one PFQ stage."""

    w: int
    a: int
    g: int

    def __post_init__(self) -> None:
        for role in ROLES:
            _check_bits(f"stage.{role}", getattr(self, role), role)


@dataclass(frozen=True)
class Rule:
    """One ordered plan rule. Roles left ``None`` keep what earlier rules or the stage gave."""

    match: str = "*"
    kind: str = "*"
    w: BitsLike = None
    a: BitsLike = None
    g: BitsLike = None
    exclude: bool = False
    reason: str = ""
    weight_scale: Optional[str] = None  # "channel" (default: one scale per output channel) or "tensor"

    def __post_init__(self) -> None:
        if self.weight_scale is not None and self.weight_scale not in WEIGHT_SCALES:
            raise PlanError(f"rule.weight_scale = {self.weight_scale!r}: use 'channel' (a scale per output channel, the "
                            "default) or 'tensor' (one scale per weight, which lets native execution run g x w on int8)")
        for name in ("match", "kind", "reason"):
            if not isinstance(getattr(self, name), str):
                raise PlanError(f"rule.{name} = {getattr(self, name)!r}: must be a string")
        if not self.match or not self.kind:
            raise PlanError("rule.match and rule.kind must not be empty (use '*' to match anything)")
        if not isinstance(self.exclude, bool):
            raise PlanError(f"rule.exclude = {self.exclude!r}: must be true or false")
        for role in ROLES:
            value = getattr(self, role)
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                if not value:
                    raise PlanError(f"rule.{role} = []: give an int or one entry per stage")
                value = tuple(_check_bits(f"rule.{role}[{i}]", v, role) for i, v in enumerate(value))
            else:
                value = _check_bits(f"rule.{role}", value, role)
            object.__setattr__(self, role, value)
        if self.exclude and (any(getattr(self, r) is not None for r in ROLES) or self.weight_scale is not None):
            raise PlanError(f"rule match={self.match!r}: an exclude rule cannot also set bits or a weight scale")

    def describe(self) -> str:
        parts = [f"match={self.match!r}"] if self.match != "*" else []
        parts += [f"kind={self.kind!r}"] if self.kind != "*" else []
        return ", ".join(parts) or "match='*'"

    def matches(self, module_path: str, kind_matches) -> bool:
        path_ok = (
            self.match == "*"
            or fnmatchcase(module_path, self.match)
            or fnmatchcase(module_path, self.match + ".*")
        )
        return path_ok and (self.kind == "*" or kind_matches(self.kind))


@dataclass(frozen=True)
class QSpec:
    """What the plan says for one compute op: bits per stage for each role, or why it is excluded."""

    w: Tuple[int, ...]
    a: Tuple[int, ...]
    g: Tuple[int, ...]
    excluded: str = ""  # non-empty: the op is left alone, and this says why
    rules: Tuple[int, ...] = ()  # indices of the plan rules that matched, in order
    weight_scale: str = "channel"  # "channel": per output channel; "tensor": one scale per weight

    def stage_bits(self, role: str) -> Tuple[int, ...]:
        return getattr(self, role)

    def quantizes(self, role: str) -> bool:
        return not self.excluded and any(b < FULL_PRECISION for b in getattr(self, role))


@dataclass(frozen=True)
class Gates:
    """FracTrain's DFQ: per gated unit, a gate picks one of K options (a[k], g[k]) per sample.

    ``a[k] = 0`` skips the unit for that sample (output = shortcut; block granularity only). Weights
    of gated ops are fixed at ``w`` bits. ``target`` is the relative cost to steer toward, in % of
    FP32 (FracTrain's cp): one number, or one per plan stage (the Scheduler advances it with the
    stage). ``controller="sign"`` adds ``beta * sign(cp - target) * cost`` to the loss, as FracTrain
    does; ``"smooth"`` replaces the sign by ``clamp((cp - target) / target, -1, 1)``, which fades to
    zero at the target instead of flipping every batch.
    """

    a: Tuple[int, ...] = (3, 4, 4, 6, 6)
    g: Tuple[int, ...] = (6, 6, 8, 8, 12)
    w: int = 4
    granularity: str = "block"
    target: Union[float, Tuple[float, ...]] = 3.0
    beta: float = 1e-3
    controller: str = "sign"

    def __post_init__(self) -> None:
        a, g = tuple(self.a), tuple(self.g)
        if len(a) < 2 or len(a) != len(g):
            raise PlanError(f"Gates(a={list(a)}, g={list(g)}): give at least two options, one a and one g per option")
        for k, (ak, gk) in enumerate(zip(a, g)):
            if isinstance(ak, bool) or not isinstance(ak, int) or not 0 <= ak <= FULL_PRECISION:
                raise PlanError(f"Gates.a[{k}] = {ak!r}: activation bits must be 0 (skip the unit) or 1..32")
            if ak == 0 and gk == 0:
                continue
            _check_bits(f"Gates.g[{k}]", gk, "g")
        if all(ak == 0 for ak in a):
            raise PlanError(f"Gates.a = {list(a)}: every option skips the unit; give at least one a > 0")
        _check_bits("Gates.w", self.w)
        if self.granularity not in ("block", "op"):
            raise PlanError(f"Gates.granularity = {self.granularity!r}: use 'block' (one gate per residual block) "
                            "or 'op' (one gate per compute op)")
        if self.granularity == "op" and 0 in a:
            raise PlanError("Gates: a = 0 (skip) needs granularity='block': only a residual block has a shortcut "
                            "to fall back on")
        target = tuple(self.target) if isinstance(self.target, (list, tuple)) else self.target
        for t in (target if isinstance(target, tuple) else (target,)):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 100:
                raise PlanError(f"Gates.target = {self.target!r}: a relative cost in % of FP32, above 0 and at most "
                                "100 (FracTrain's cifar preset uses 1.5..3)")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or self.beta < 0:
            raise PlanError(f"Gates.beta = {self.beta!r}: must be a number >= 0")
        if self.controller not in ("sign", "smooth"):
            raise PlanError(f"Gates.controller = {self.controller!r}: use 'sign' (FracTrain) or 'smooth'")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "g", g)
        object.__setattr__(self, "target", target)

    @property
    def num_options(self) -> int:
        return len(self.a)

    @property
    def skip_options(self) -> Tuple[int, ...]:
        return tuple(k for k, ak in enumerate(self.a) if ak == 0)

    def targets(self, num_stages: int) -> Tuple[float, ...]:
        if isinstance(self.target, tuple):
            return tuple(float(t) for t in self.target)
        return (float(self.target),) * num_stages

    def to_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {"a": list(self.a), "g": list(self.g), "w": self.w, "granularity": self.granularity,
                                "target": list(self.target) if isinstance(self.target, tuple) else self.target,
                                "beta": self.beta}
        if self.controller != "sign":
            data["controller"] = self.controller
        return data


@dataclass(frozen=True)
class Plan:
    """An ordered ladder of stages and ordered rules over compute ops."""

    stages: Tuple[Stage, ...]
    rules: Tuple[Rule, ...] = field(default=())
    switch: Optional[SwitchRule] = None  # when to advance stages; None: LossPlateau() for a ladder
    gates: Optional[Gates] = None  # DFQ: per-sample precision of gated units

    def __post_init__(self) -> None:
        stages = tuple(self.stages) if isinstance(self.stages, (list, tuple)) else self.stages
        if not isinstance(stages, tuple) or not stages:
            raise PlanError(f"plan.stages = {self.stages!r}: a plan needs at least one stage")
        for i, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise PlanError(f"plan.stages[{i}] = {stage!r}: expected fracpass.Stage(w=, a=, g=)")
        rules = tuple(self.rules)
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise PlanError(f"plan.rules[{i}] = {rule!r}: expected fracpass.Rule(...)")
            for role in ROLES:
                value = getattr(rule, role)
                if isinstance(value, tuple) and len(value) != len(stages):
                    raise PlanError(
                        f"plan.rules[{i}].{role} = {list(value)}: has {len(value)} entries but the plan "
                        f"has {len(stages)} stages; give one entry per stage or a single int"
                    )
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "rules", rules)
        if self.switch is not None:
            if not isinstance(self.switch, SwitchRule):
                raise PlanError(f"plan.switch = {self.switch!r}: expected fracpass.LossPlateau, AtSteps, AtEpochs or Budget")
            if isinstance(self.switch, AtSteps) and len(self.switch.boundaries()) != len(stages) - 1:
                raise PlanError(f"plan.switch: {type(self.switch).__name__} has {len(self.switch.boundaries())} "
                                f"boundaries but the plan has {len(stages)} stages; give {len(stages) - 1}")
        if self.gates is not None:
            if not isinstance(self.gates, Gates):
                raise PlanError(f"plan.gates = {self.gates!r}: expected fracpass.Gates(...)")
            if isinstance(self.gates.target, tuple) and len(self.gates.target) != len(stages):
                raise PlanError(f"plan.gates.target = {list(self.gates.target)}: has {len(self.gates.target)} entries "
                                f"but the plan has {len(stages)} stages; give one target per stage or a single number")

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def static(cls, w: int = 8, a: int = 8, g: int = 8, exclude: Iterable[str] = (), rules: Iterable[Rule] = ()) -> "Plan":
        """One stage: every compute op at w/a/g bits, except the excluded module paths (globs)."""
        return cls(stages=(Stage(w=w, a=a, g=g),), rules=_exclusions(exclude) + tuple(rules))

    @classmethod
    def progressive(
        cls,
        fw: Sequence[int] = (3, 4, 6, 8),
        bw: Sequence[int] = (6, 6, 8, 8),
        exclude: Iterable[str] = (),
        rules: Iterable[Rule] = (),
        switch: Optional[SwitchRule] = None,
        budget: Optional[float] = None,
        total_steps: Optional[int] = None,
    ) -> "Plan":
        """FracTrain's PFQ ladder: stage k quantizes weights and activations to fw[k], gradients to bw[k].

        ``switch`` says when to advance (default ``LossPlateau()``); or give ``budget`` (a fraction
        of the static last-stage plan's training BitOPs) and ``total_steps``, which
        ``fracpass.schedule`` turns into fixed boundaries.
        """
        if budget is not None or total_steps is not None:
            if switch is not None:
                raise PlanError("Plan.progressive: give either switch= or budget= with total_steps=, not both")
            if budget is None or total_steps is None:
                raise PlanError("Plan.progressive: budget mode needs both budget= (e.g. 0.35) and total_steps=")
            switch = Budget(fraction=budget, total_steps=total_steps)
        fw, bw = tuple(fw), tuple(bw)
        if not fw or not bw:
            raise PlanError(f"Plan.progressive(fw={list(fw)}, bw={list(bw)}): the ladder is empty; give at least one stage")
        if len(fw) != len(bw):
            raise PlanError(
                f"Plan.progressive: fw has {len(fw)} stages {list(fw)} but bw has {len(bw)} {list(bw)}; "
                "give one forward and one backward width per stage"
            )
        stages = []
        for k, (f, b) in enumerate(zip(fw, bw)):
            _check_bits(f"fw[{k}]", f)
            _check_bits(f"bw[{k}]", b, "g")
            stages.append(Stage(w=f, a=f, g=b))
        return cls(stages=tuple(stages), rules=_exclusions(exclude) + tuple(rules), switch=switch)

    def with_gates(self, gates: Gates) -> "Plan":
        """This plan with DFQ gates: gated units take their bits from the gates' options."""
        import dataclasses

        if not isinstance(gates, Gates):
            raise PlanError(f"with_gates({gates!r}): expected fracpass.Gates(a=..., g=..., w=..., target=...)")
        return dataclasses.replace(self, gates=gates)

    @classmethod
    def fractrain(cls, preset: str = "cifar") -> "Plan":
        """FracTrain's full method (PFQ + DFQ) as in the paper: gates pick (a, g) per sample and block,
        and the loss-plateau indicator steps the cost target up, one target per stage.

        "cifar": a = (3,4,4,6,6), g = (6,6,8,8,12), w = 4, targets 1.5/2/2.5/3 %, LossPlateau(0.05, 0.3).
        "imagenet": a = (3,4,6,8), g = (6,8,12,16), w = 6, targets 3/3.5/4/4.5 %.
        Ops outside gated units (stem, classifier) run at w bits with the most precise option's a
        and g; a block's shortcut conv at full precision; add rules to change either.
        """
        presets = {
            "cifar": Gates(a=(3, 4, 4, 6, 6), g=(6, 6, 8, 8, 12), w=4, target=(1.5, 2.0, 2.5, 3.0), beta=1e-3),
            "imagenet": Gates(a=(3, 4, 6, 8), g=(6, 8, 12, 16), w=6, target=(3.0, 3.5, 4.0, 4.5), beta=1e-3),
        }
        if preset not in presets:
            raise PlanError(f"Plan.fractrain({preset!r}): unknown preset; use one of {sorted(presets)}")
        gates = presets[preset]
        stage = Stage(w=gates.w, a=max(gates.a), g=max(gates.g))
        return cls(stages=(stage,) * len(gates.target), switch=LossPlateau(threshold=0.05, decay=0.3), gates=gates)

    # -- resolution -----------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def resolve(self, module_path: str, kind_matches) -> QSpec:
        """Apply the rules in order to an op at ``module_path``; ``kind_matches(glob) -> bool``."""
        bits = {role: [getattr(s, role) for s in self.stages] for role in ROLES}
        excluded, hits, weight_scale = "", [], "channel"
        for i, rule in enumerate(self.rules):
            if not rule.matches(module_path, kind_matches):
                continue
            hits.append(i)
            if rule.exclude:
                excluded = rule.reason or f"excluded by plan rule {i} ({rule.describe()})"
                continue
            for role in ROLES:
                value = getattr(rule, role)
                if value is not None:
                    bits[role] = list(value) if isinstance(value, tuple) else [value] * self.num_stages
            weight_scale = rule.weight_scale or weight_scale
        return QSpec(
            w=tuple(bits["w"]), a=tuple(bits["a"]), g=tuple(bits["g"]), excluded=excluded, rules=tuple(hits),
            weight_scale=weight_scale,
        )

    def check_rules_matched(self, hits: Mapping[int, int], module_paths: Sequence[str], kinds: Sequence[str] = ()) -> None:
        """Raise PlanError for a rule that matched no compute op: the closest module paths, or for a
        rule whose ``kind`` fits no op, the op kinds the model has."""
        for i, rule in enumerate(self.rules):
            if hits.get(i, 0):
                continue
            present = sorted(set(kinds))
            if rule.kind != "*" and present and not any(fnmatchcase(k, rule.kind) for k in present):
                hint = (f"no op of kind {rule.kind!r}; the model's op kinds are {', '.join(present)} "
                        "(kind takes a glob, e.g. 'conv*')")
            else:
                close = difflib.get_close_matches(rule.match.replace("*", ""), sorted(set(module_paths)), n=5,
                                                  cutoff=0.3)
                hint = f"closest module paths: {', '.join(close)}" if close else (
                    f"module paths with compute ops include: {', '.join(sorted(set(module_paths))[:5])}"
                )
            raise PlanError(f"plan rule {i} ({rule.describe()}) matches no compute op in the model; {hint}")

    # -- files ----------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        rules = []
        for rule in self.rules:
            entry: Dict[str, Any] = {}
            for f in fields(Rule):
                value = getattr(rule, f.name)
                if value != f.default:
                    entry[f.name] = list(value) if isinstance(value, tuple) else value
            rules.append(entry)
        out: Dict[str, Any] = {"format": FORMAT_VERSION, "stages": [
            {"w": s.w, "a": s.a, "g": s.g} for s in self.stages
        ]}
        if rules:
            out["rules"] = rules
        if self.switch is not None:
            out["switch"] = self.switch.to_dict()
        if self.gates is not None:
            out["gates"] = self.gates.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "plan") -> "Plan":
        known = {"format", "stages", "rules", "switch", "gates"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"{source}: unknown section(s) {unknown}; this version of fracpass reads {sorted(known)}")
        version = data.get("format", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise PlanError(f"{source}: format = {version!r}, but this version of fracpass reads format {FORMAT_VERSION}")
        stages = []
        for i, entry in enumerate(_table_list(data, "stages", source)):
            missing = [r for r in ROLES if r not in entry]
            extra = sorted(set(entry) - set(ROLES))
            if missing or extra:
                raise PlanError(f"{source}: stages[{i}] needs exactly the keys w, a, g (missing {missing}, unknown {extra})")
            try:
                stages.append(Stage(**entry))
            except PlanError as e:
                raise PlanError(f"{source}: stages[{i}]: {e}") from e
        rules = []
        names = {f.name for f in fields(Rule)}
        for i, entry in enumerate(_table_list(data, "rules", source, required=False)):
            extra = sorted(set(entry) - names)
            if extra:
                raise PlanError(f"{source}: rules[{i}] has unknown key(s) {extra}; known keys: {sorted(names)}")
            try:
                rules.append(Rule(**entry))
            except PlanError as e:
                raise PlanError(f"{source}: rules[{i}]: {e}") from e
        switch = None
        if "switch" in data:
            if not isinstance(data["switch"], dict):
                raise PlanError(f"{source}: 'switch' must be a table ([switch])")
            switch = rule_from_dict(data["switch"], source)
        gates = None
        if "gates" in data:
            entry = data["gates"]
            if not isinstance(entry, dict):
                raise PlanError(f"{source}: 'gates' must be a table ([gates])")
            names = {f.name for f in fields(Gates)}
            extra = sorted(set(entry) - names)
            if extra:
                raise PlanError(f"{source}: [gates] has unknown key(s) {extra}; known keys: {sorted(names)}")
            try:
                gates = Gates(**entry)
            except PlanError as e:
                raise PlanError(f"{source}: [gates]: {e}") from e
        try:
            return cls(stages=tuple(stages), rules=tuple(rules), switch=switch, gates=gates)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from e

    def to_toml(self) -> str:
        data = self.to_dict()
        lines = ["# fracpass precision plan", f"format = {data['format']}", ""]
        for section in ("stages", "rules"):
            for entry in data.get(section, ()):
                lines += toml_table(f"[[{section}]]", entry)
        if "switch" in data:
            lines += toml_table("[switch]", data["switch"])
        if "gates" in data:
            lines += toml_table("[gates]", data["gates"])
        return "\n".join(lines)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_toml())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Plan":
        return cls.from_dict(read_toml(path, "plan file", PlanError), source=str(path))


def _exclusions(patterns: Iterable[str]) -> Tuple[Rule, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    return tuple(Rule(match=p, exclude=True, reason=f"excluded by plan (exclude {p!r})") for p in patterns)


def _table_list(data: Mapping[str, Any], key: str, source: str, required: bool = True):
    value = data.get(key, [] if not required else None)
    if value is None:
        raise PlanError(f"{source}: no [[{key}]] tables; a plan needs at least one stage")
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PlanError(f"{source}: '{key}' must be an array of tables ([[{key}]]), got {type(value).__name__}")
    return value
