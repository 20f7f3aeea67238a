"""Hardware profiles (the ``*.toml`` files beside this module) and the cost model that reads them.

A profile is either ``kind = "bit-flexible"`` (throughput and energy scale with the operand bit
widths, as in Bit Fusion) or ``"gpu"`` / ``"cpu"`` with a list of supported precisions, where an
op's bits round up to the narrowest precision that holds them. Latency per product is a roofline,
max(MACs / rate, bytes / bandwidth). Adding a profile is adding a file; ``load_target`` also takes
a path to a profile of your own.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple, Union

from fracpass._toml import read_toml
from fracpass.errors import FracpassError

__all__ = ["TargetError", "Precision", "Target", "load_target", "available_targets"]

HERE = pathlib.Path(__file__).resolve().parent
KINDS = ("bit-flexible", "gpu", "cpu")


class TargetError(FracpassError, ValueError):
    """A hardware profile is missing, malformed or cannot run an op."""


@dataclass(frozen=True)
class Precision:
    name: str
    bits: int
    macs_per_s: float


@dataclass(frozen=True)
class Rate:
    macs_per_s: float
    precision: str  # what the op runs as, e.g. "int4", "2x2 bricks"
    rounded: bool  # True when the op's bits were rounded up to a supported precision


@dataclass(frozen=True)
class Target:
    name: str
    kind: str
    description: str
    source: str
    bandwidth_bytes_per_s: float
    precisions: Tuple[Precision, ...] = ()
    macs_per_s_8x8: float = 0.0
    brick_bits: int = 2
    energy_pj_per_mac_8x8: float = 0.0
    energy_pj_per_byte: float = 0.0
    watts: float = 0.0
    cores: int = 0  # cpu profiles: cores the rates and bandwidth are for (0: not given)

    def per_cores(self, used: int) -> "Target":
        """The share of this profile that ``used`` cores get: every rate and the bandwidth times
        used / cores (``fracpass.bench`` on a machine running fewer cores than the profile's)."""
        if self.kind != "cpu" or not self.cores:
            with_cores = ", ".join(n for n in available_targets() if load_target(n).cores)
            raise TargetError(f"target {self.name!r} ({self.source}) is not a cpu profile with a core count ('cores'), "
                              f"so it cannot be scaled to the {used} core(s) this run uses; use one that gives it "
                              f"(built-in: {with_cores}), or add 'cores = N' to your profile")
        share = used / self.cores
        return dataclasses.replace(
            self, name=f"{self.name} x {used}/{self.cores} cores", bandwidth_bytes_per_s=self.bandwidth_bytes_per_s * share,
            precisions=tuple(dataclasses.replace(p, macs_per_s=p.macs_per_s * share) for p in self.precisions),
            watts=self.watts * share, cores=used)

    def rate(self, bits_x: int, bits_y: int) -> Rate:
        """MAC throughput for a product of a ``bits_x``-bit and a ``bits_y``-bit operand."""
        if self.kind == "bit-flexible":
            cx, cy = self._bricks(bits_x), self._bricks(bits_y)
            return Rate(self.macs_per_s_8x8 * (8 / cx) * (8 / cy), f"{cx}x{cy}-bit bricks",
                        rounded=(cx, cy) != (bits_x, bits_y))
        need = max(bits_x, bits_y)
        fitting = [p for p in self.precisions if p.bits >= need]
        if not fitting:
            widest = max(self.precisions, key=lambda p: p.bits)
            raise TargetError(f"target {self.name!r} ({self.source}) has no precision for {need}-bit operands "
                              f"(widest: {widest.name}, {widest.bits} bits)")
        narrowest = min(p.bits for p in fitting)
        best = max((p for p in fitting if p.bits == narrowest), key=lambda p: p.macs_per_s)
        return Rate(best.macs_per_s, best.name, rounded=best.bits != need)

    def _bricks(self, bits: int) -> int:
        return max(self.brick_bits, 1 << max(0, math.ceil(math.log2(bits))))

    def latency_s(self, macs: float, nbytes: float, bits_x: int, bits_y: int) -> float:
        """Roofline: the slower of compute and memory traffic."""
        return max(macs / self.rate(bits_x, bits_y).macs_per_s, nbytes / self.bandwidth_bytes_per_s)

    def memory_bound(self, macs: float, nbytes: float, bits_x: int, bits_y: int) -> bool:
        return nbytes / self.bandwidth_bytes_per_s > macs / self.rate(bits_x, bits_y).macs_per_s

    def energy_j(self, macs: float, nbytes: float, bits_x: int, bits_y: int) -> float:
        """Bit-flexible: per-MAC energy scaled by BitBricks used, plus per-byte memory energy.
        GPU/CPU: board power times roofline time (the datasheets give no per-op energy)."""
        if self.kind == "bit-flexible":
            bricks = self._bricks(bits_x) * self._bricks(bits_y) / 64.0  # 8x8 uses 16 of 16 bricks -> 1
            return 1e-12 * (macs * self.energy_pj_per_mac_8x8 * bricks + nbytes * self.energy_pj_per_byte)
        return self.watts * self.latency_s(macs, nbytes, bits_x, bits_y)


def available_targets() -> Tuple[str, ...]:
    return tuple(sorted(p.stem for p in HERE.glob("*.toml")))


def load_target(target: Union[str, pathlib.Path, Target]) -> Target:
    """A profile by name (``available_targets()``) or by path to a TOML file."""
    if isinstance(target, Target):
        return target
    path = pathlib.Path(target)
    if path.suffix != ".toml":
        path = HERE / f"{target}.toml"
        if not path.exists():
            raise TargetError(f"unknown target {str(target)!r}; built-in targets: {', '.join(available_targets())} "
                              "(or pass the path of a profile .toml)")
    return _parse(read_toml(path, "target profile", TargetError), str(path))


def _field(data: Mapping[str, Any], key: str, source: str, kind=float, positive: bool = True) -> Any:
    if key not in data:
        raise TargetError(f"{source}: missing field {key!r}")
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TargetError(f"{source}: field {key!r} = {value!r} must be a {kind.__name__}")
    if positive and kind in (float, int) and not value > 0:
        raise TargetError(f"{source}: field {key!r} = {value!r} must be positive")
    return value


def _section(data: Mapping[str, Any], key: str, source: str) -> Dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise TargetError(f"{source}: missing table [{key}]")
    return value


def _parse(data: Mapping[str, Any], source: str) -> Target:
    name = _field(data, "name", source, str)
    kind = _field(data, "kind", source, str)
    if kind not in KINDS:
        raise TargetError(f"{source}: field 'kind' = {kind!r} must be one of {KINDS}")
    memory = _section(data, "memory", source)
    common = dict(name=name, kind=kind, description=str(data.get("description", "")),
                  source=source, bandwidth_bytes_per_s=_field(memory, "bandwidth_bytes_per_s", f"{source} [memory]"))
    if kind == "bit-flexible":
        compute = _section(data, "compute", source)
        where = f"{source} [compute]"
        return Target(**common, macs_per_s_8x8=_field(compute, "macs_per_s_8x8", where),
                      brick_bits=_field(compute, "brick_bits", where, int),
                      energy_pj_per_mac_8x8=_field(compute, "energy_pj_per_mac_8x8", where),
                      energy_pj_per_byte=_field(memory, "energy_pj_per_byte", f"{source} [memory]"))
    entries = data.get("precisions")
    if not isinstance(entries, list) or not entries:
        raise TargetError(f"{source}: a {kind} profile needs [[precisions]] tables (name, bits, macs_per_s)")
    precisions = []
    for i, entry in enumerate(entries):
        where = f"{source} precisions[{i}]"
        precisions.append(Precision(_field(entry, "name", where, str), _field(entry, "bits", where, int),
                                    _field(entry, "macs_per_s", where)))
    power = _section(data, "power", source)
    cores = _field(data, "cores", source, int) if "cores" in data else 0
    return Target(**common, precisions=tuple(precisions), watts=_field(power, "watts", f"{source} [power]"), cores=cores)
