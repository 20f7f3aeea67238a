"""What the training-loop integrations share: the Scheduler's log entries and its state on disk."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from fracpass.errors import FracpassError

__all__ = ["log_entries", "gate_hubs", "state_file", "save_scheduler_state", "load_scheduler_state"]

PREFIX = "fracpass/"
FORMAT = 1


def log_entries(scheduler, gates: bool = True) -> Dict[str, float]:
    """The Scheduler's stage, the stage's w/a/g bits and switch count, and, for a gated model, each
    gate hub's mean cost and target (% of FP32) and its mix: the share of samples per option,
    averaged over its units, on the last batch. Reading the gates syncs with the device once."""
    stage = scheduler.plan.stages[scheduler.stage]
    entries: Dict[str, float] = {
        PREFIX + "stage": scheduler.stage, PREFIX + "w_bits": stage.w, PREFIX + "a_bits": stage.a,
        PREFIX + "g_bits": stage.g, PREFIX + "switches": len(scheduler.history),
    }
    if gates:
        for prefix, hub in gate_hubs(scheduler.qmodel):
            entries.update(_gate_entries(prefix, hub))
    return entries


def gate_hubs(qmodel):
    from fracpass.api import gate_hub, parts_of

    parts = parts_of(qmodel)
    if parts is None:
        hub = gate_hub(qmodel)
        return [(PREFIX, hub)] if hub is not None else []
    return [(f"{PREFIX}{path}/", gate_hub(part)) for path, part in parts if gate_hub(part) is not None]


def _gate_entries(prefix: str, hub) -> Dict[str, float]:
    stats = hub.stats()
    if stats is None:  # no batch has gone through the gates yet
        return {}
    entries = {prefix + "gate_cost": stats.mean_cost, prefix + "gate_target": stats.target}
    mixes = list(stats.units.values())
    for k, (a, g) in enumerate(stats.options):
        name = f"a{a}_g{g}" if a else f"skip_g{g}"
        entries[f"{prefix}gate_mix/{name}"] = sum(mix[k] for mix in mixes) / len(mixes)
    return entries


def state_file(directory, rank: int = 0, world_size: int = 1) -> Path:
    """Where a checkpoint keeps the Scheduler's state: one file, or one per rank under several processes
    (each rank's plateau window holds its own losses until the window's end averages them)."""
    name = "fracpass_scheduler.json" if world_size <= 1 else f"fracpass_scheduler_rank{rank}.json"
    return Path(directory) / name


def save_scheduler_state(scheduler, path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, "step": int(step), "scheduler": scheduler.state_dict()}, indent=1))


def load_scheduler_state(scheduler, path: Path, step: Optional[int] = None) -> Dict[str, Any]:
    """Restore ``scheduler`` from ``path``; ``step``, when given, must be the step the file was saved at."""
    if not path.is_file():
        raise FracpassError(f"resuming: {str(path)!r} does not exist, so the fracpass Scheduler's stage and history "
                            "cannot be restored; resume from a checkpoint saved with the fracpass callback in the loop")
    data = json.loads(path.read_text())
    if step is not None and data["step"] != step:
        raise FracpassError(f"resuming at step {step}, but {str(path)!r} holds the Scheduler's state at step "
                            f"{data['step']}; resume from the checkpoint folder that file belongs to")
    scheduler.load_state_dict(data["scheduler"])
    return data
