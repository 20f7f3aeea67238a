"""One JSON file per finished run, so that a comparison can span processes and sessions.

``<out>/runs/<recipe>-seed<k>.json`` holds the run's record with the data set, the settings and the
environment it ran under; ``<recipe>-seed<k>.ckpt`` holds an unfinished run's progress, from which
it goes on bit for bit. A comparison started again with the same ``--out`` reuses the runs whose
file exists (same data set and settings) and trains only the missing ones; ``--merge`` builds one
comparison from several such folders.
"""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from fracpass.errors import FracpassError

__all__ = ["run_path", "checkpoint_path", "write_run", "read_run", "load_part", "environment"]

log = logging.getLogger("fracpass.experiments")


def environment() -> Dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine()}


def run_path(out_dir, recipe: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / f"{recipe.replace('/', '-')}-seed{seed}.json"


def checkpoint_path(out_dir, recipe: str, seed: int) -> Path:
    """Where an unfinished run keeps its progress (deleted once its record is written)."""
    return run_path(out_dir, recipe, seed).with_suffix(".ckpt")


def write_run(out_dir, dataset: str, config: Dict[str, Any], record: Dict[str, Any], command: str = "") -> Path:
    path = run_path(out_dir, record["recipe"], record["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")  # a run killed while writing leaves no half file behind
    tmp.write_text(json.dumps({"dataset": dataset, "config": config, "environment": environment(),
                               "command": command, "run": record}))
    tmp.replace(path)
    return path


def read_run(path, dataset: Optional[str] = None, config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A run file; with ``dataset`` and ``config``, an error when it was trained on other ones."""
    saved = json.loads(Path(path).read_text())
    if config is not None:
        config = json.loads(json.dumps(config))  # as saved: tuples become lists
    if dataset is not None and saved["dataset"] != dataset:
        raise FracpassError(f"{path}: trained on {saved['dataset']!r}, not {dataset!r}; use another --out")
    if config is not None and saved["config"] != config:
        diff = {k: (saved["config"].get(k), v) for k, v in config.items() if saved["config"].get(k) != v}
        raise FracpassError(f"{path}: trained with other settings {diff} (saved, now); use another --out or the "
                            "same settings")
    return saved


def load_part(folder) -> Dict[str, Any]:
    """A folder as one part of a merge: its ``results.json`` if it has one, else its ``runs/*.json``."""
    folder = Path(folder)
    if (folder / "results.json").is_file():
        return json.loads((folder / "results.json").read_text())
    files = sorted((folder / "runs").glob("*.json"))
    if not files:
        raise FracpassError(f"--merge {folder}: holds neither results.json nor runs/*.json")
    saved: List[Dict[str, Any]] = [read_run(p) for p in files]
    first = saved[0]
    for path, s in zip(files, saved):
        for key in ("dataset", "config"):
            if s[key] != first[key]:
                raise FracpassError(f"--merge {folder}: {path.name} differs from {files[0].name} in {key}")
    runs = [s["run"] for s in saved]
    return {"dataset": first["dataset"], "config": first["config"], "environment": first["environment"],
            "command": " ; ".join(sorted({s["command"] for s in saved if s["command"]})),
            "recipes": sorted({r["recipe"] for r in runs}), "seeds": sorted({r["seed"] for r in runs}),
            "wall_s": sum(r["wall_s"] for r in runs), "runs": runs}
