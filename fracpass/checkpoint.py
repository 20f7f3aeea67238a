"""Checkpoints that resume bit-exactly and cannot be loaded into a model of another plan.

``save_checkpoint(path, qmodel, optimizer, scheduler, **extra)`` writes one file holding the model's,
the optimizer's and the Scheduler's state, the plan, and torch's random number generator states;
``load_checkpoint(path, qmodel, optimizer, scheduler)`` checks the plan and restores all of it.

Why the generator state: the gradient quantizers' stochastic-rounding noise is drawn from torch's
default generator (as is a DataLoader's shuffle), so the three ``state_dict``\\ s alone resume with
different noise. Python's ``random`` and NumPy's global generator are not saved: fracpass does not
use them; pass their state in ``extra`` if your loop does. Under DistributedDataParallel every rank
has its own generator state: save one file per rank to resume each exactly.

Plan-owned state (bits per stage, gate options and targets) is checked, never loaded:
``check_plan_state`` compares every quantizer and gate hub of a state_dict with the model's and
raises ``PlanError`` naming the ones that differ; transformed models run it in ``load_state_dict``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from fracpass.errors import FracpassError, PlanError
from fracpass.quant import PLAN_MISMATCH_FIX

__all__ = ["save_checkpoint", "load_checkpoint", "check_plan_state", "FORMAT"]

FORMAT = 1
_SHOWN = 8  # mismatching modules listed in full; the rest are counted


def check_plan_state(qmodel: nn.Module, state_dict: Mapping[str, Any], where: str = "load_state_dict") -> None:
    """Raise PlanError if ``state_dict`` was saved under another plan: its quantizers' bits per stage,
    its gate options or targets differ from ``qmodel``'s, or it is at a stage the plan lacks."""
    owners = [(name, m) for name, m in qmodel.named_modules() if hasattr(m, "plan_mismatch")]
    diffs: List[str] = []
    keys = set()
    for name, module in owners:
        found = module.plan_mismatch(state_dict, f"{name}." if name else "")
        if found:
            diffs.append(f"{name or type(module).__name__}: {'; '.join(found)}")
            keys.update(key for key in module.PLAN_BUFFERS if any(line.startswith(key + " ") for line in found))
    if not diffs:
        return
    listed = "\n  ".join(diffs[:_SHOWN]) + (f"\n  ... and {len(diffs) - _SHOWN} more" if len(diffs) > _SHOWN else "")
    raise PlanError(f"{where}: the checkpoint was saved from a model transformed with a different plan; "
                    f"{len(diffs)} of {len(owners)} quantizers and gate hubs differ:\n  {listed}\n"
                    + PLAN_MISMATCH_FIX.format(keys=", ".join(sorted(keys)) or "none") + ".")


def save_checkpoint(path: Union[str, Path], qmodel: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler=None, **extra: Any) -> None:
    """Write ``qmodel``'s state, the plan, ``optimizer``'s and ``scheduler``'s state, torch's RNG
    states and ``extra`` (e.g. ``epoch=3``) to ``path`` with ``torch.save``."""
    from fracpass import __version__
    from fracpass.state import model_state

    state = model_state(qmodel)
    path = Path(path)
    if not path.parent.is_dir():
        raise FracpassError(f"save_checkpoint: the directory {str(path.parent)!r} does not exist; create it first")
    rng: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({
        "format": FORMAT, "fracpass_version": __version__, "plan": state.plan.to_dict(),
        "model": qmodel.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng, "extra": dict(extra),
    }, path)


def load_checkpoint(path: Union[str, Path], qmodel: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler=None, *, restore_rng: bool = True, map_location=None,
                    weights_only: bool = True) -> Dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote into ``qmodel`` (transformed with the same plan),
    ``optimizer`` and ``scheduler``, then torch's RNG states; returns the ``extra`` values.

    ``weights_only=False`` is needed only if ``extra`` holds objects other than tensors, numbers,
    strings and containers of them (see ``torch.load``).
    """
    from fracpass.state import model_state

    state = model_state(qmodel)
    try:
        saved = torch.load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError as e:
        raise FracpassError(f"load_checkpoint: no checkpoint at {str(path)!r}") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise FracpassError(f"load_checkpoint: {str(path)!r} is not a fracpass checkpoint (format {FORMAT}); write one "
                            "with fracpass.save_checkpoint, or load a plain state_dict with qmodel.load_state_dict")
    _check_plan(path, saved["plan"], state.plan.to_dict())
    qmodel.load_state_dict(saved["model"])
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if saved[name] is None:
            raise FracpassError(f"load_checkpoint: {str(path)!r} holds no {name} state; it was saved without one "
                                f"(save_checkpoint(path, qmodel, {name}=...)); leave {name} out of this call")
        target.load_state_dict(saved[name])
    if restore_rng:
        torch.set_rng_state(saved["rng"]["torch"].cpu())
        cuda = saved["rng"].get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    return dict(saved["extra"])


def _check_plan(path, saved: Mapping[str, Any], own: Mapping[str, Any]) -> None:
    diffs = [f"{key}: {saved.get(key)} in the checkpoint, {own.get(key)} in this model's plan"
             for key in sorted(set(saved) | set(own)) if saved.get(key) != own.get(key)]
    if diffs:
        raise PlanError(f"load_checkpoint: {str(path)!r} was saved with a different plan ({'; '.join(diffs)}); "
                        "transform the model with the checkpoint's plan: fracpass.Plan.from_dict(torch.load(path)"
                        "['plan'])")
