"""Precision plans: a ladder of stages plus ordered per-op rules, and the QSpec they resolve to.

A plan is data. ``Plan.static`` and ``Plan.progressive`` build the common ones; ``Plan.load`` and
``Plan.save`` round-trip it through TOML::

    format = 1

    [[stages]]          # one table per PFQ stage, lowest precision first
    w = 3               # weight bits
    a = 3               # activation bits
    g = 6               # gradient bits (32 = not quantized, for any role)

    [[rules]]           # ordered; for each role the last matching rule wins
    match = "conv1"     # glob on the module path; a module also matches everything under it
    exclude = true
    reason = "stem kept at full precision"

    [[rules]]
    kind = "depthwise"  # glob on the op kind ("conv2d", "linear", "matmul", ...) or a trait
    w = 8               # an int for every stage, or a list with one entry per stage
    g = 16
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
from fracpass.switch import AtSteps, Budget, SwitchRule, rule_from_dict

__all__ = ["Stage", "Rule", "Plan", "QSpec", "FORMAT_VERSION"]

FORMAT_VERSION = 1
ROLES = ("w", "a", "g")
_ROLE_NAMES = {"w": "weight", "a": "act", "g": "grad"}

BitsLike = Union[int, Sequence[int], None]


def _check_bits(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{where} = {value!r}: bits must be an integer from 1 to 32 (32 = not quantized)")
    if not 1 <= value <= FULL_PRECISION:
        raise PlanError(f"{where} = {value}: bits must be from 1 to 32 (32 = not quantized)")
    return value


@dataclass(frozen=True)
class Stage:
    """Bits of each role in one PFQ stage."""

    w: int
    a: int
    g: int

    def __post_init__(self) -> None:
        for role in ROLES:
            _check_bits(f"stage.{role}", getattr(self, role))


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

    def __post_init__(self) -> None:
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
                value = tuple(_check_bits(f"rule.{role}[{i}]", v) for i, v in enumerate(value))
            else:
                value = _check_bits(f"rule.{role}", value)
            object.__setattr__(self, role, value)
        if self.exclude and any(getattr(self, r) is not None for r in ROLES):
            raise PlanError(f"rule match={self.match!r}: an exclude rule cannot also set bits")

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

    def stage_bits(self, role: str) -> Tuple[int, ...]:
        return getattr(self, role)

    def quantizes(self, role: str) -> bool:
        return not self.excluded and any(b < FULL_PRECISION for b in getattr(self, role))


@dataclass(frozen=True)
class Plan:
    """An ordered ladder of stages and ordered rules over compute ops."""

    stages: Tuple[Stage, ...]
    rules: Tuple[Rule, ...] = field(default=())
    switch: Optional[SwitchRule] = None  # when to advance stages; None: LossPlateau() for a ladder

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
            _check_bits(f"bw[{k}]", b)
            stages.append(Stage(w=f, a=f, g=b))
        return cls(stages=tuple(stages), rules=_exclusions(exclude) + tuple(rules), switch=switch)

    # -- resolution -----------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def resolve(self, module_path: str, kind_matches) -> QSpec:
        """Apply the rules in order to an op at ``module_path``; ``kind_matches(glob) -> bool``."""
        bits = {role: [getattr(s, role) for s in self.stages] for role in ROLES}
        excluded, hits = "", []
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
        return QSpec(
            w=tuple(bits["w"]), a=tuple(bits["a"]), g=tuple(bits["g"]), excluded=excluded, rules=tuple(hits)
        )

    def check_rules_matched(self, hits: Mapping[int, int], module_paths: Sequence[str]) -> None:
        """Raise PlanError for a rule that matched no compute op, listing the closest paths."""
        for i, rule in enumerate(self.rules):
            if hits.get(i, 0):
                continue
            close = difflib.get_close_matches(rule.match.replace("*", ""), sorted(set(module_paths)), n=5, cutoff=0.3)
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
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "plan") -> "Plan":
        known = {"format", "stages", "rules", "switch"}
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
        try:
            return cls(stages=tuple(stages), rules=tuple(rules), switch=switch)
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
