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

__all__ = ["run_path", "checkpoint_path", "write_run", "read_run", "load_part", "environment", "status",
           "status_table"]

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


def status(folder) -> List[Dict[str, Any]]:
    """What a comparison's folder holds, run by run, for a comparison that spans sessions: each finished run
    (its file) and each unfinished one (its checkpoint: the iteration it goes on from and its last
    evaluation). Reads the files only; nothing is trained or changed."""
    runs = Path(folder) / "runs"
    if not runs.is_dir():
        raise FracpassError(f"--status {folder}: no runs/ folder there (a comparison's --out holds one)")
    rows: List[Dict[str, Any]] = []
    for path in sorted(runs.glob("*.json")):
        r = read_run(path)["run"]
        rows.append({"recipe": r["recipe"], "seed": r["seed"], "finished": True, "iteration": r["iterations"],
                     "iterations": r["iterations"], "val": _best_val(r), "test": r.get("test_at_best"),
                     "final_test": r["final_accuracy"], "wall_s": r["wall_s"], "resumed_at": r.get("resumed_at", [])})
    for path in sorted(runs.glob("*.ckpt")):
        try:
            state = torch.load(path, weights_only=False, map_location="cpu")
            history = state["history"]
        except Exception as e:  # a checkpoint of another format, or damaged: say so, go on with the rest
            rows.append({"recipe": path.stem, "seed": None, "finished": False, "error": f"{path.name}: unreadable ({e})"})
            continue
        val, test = history.get("val_evals") or [], history.get("evals") or []
        rows.append({"recipe": state["recipe"], "seed": state["seed"], "finished": False, "iteration": state["iteration"],
                     "iterations": state["settings"].get("iterations"),
                     "val": tuple(val[-1]) if val else None, "test": test[-1][1] if test else None,
                     "wall_s": state["wall_s"], "resumed_at": history.get("resumed_at", [])})
    return rows


def _best_val(run: Dict[str, Any]):
    """(iteration, accuracy) of the best validation evaluation, or None without a validation split."""
    best = run.get("best_iteration")
    return (best, run["best_val_accuracy"]) if best is not None else None


def status_table(rows: List[Dict[str, Any]]) -> str:
    """``status``'s rows as text: one line per run."""
    lines = []
    for r in sorted(rows, key=lambda r: (r["recipe"], -1 if r["seed"] is None else r["seed"])):
        if "error" in r:
            lines.append(f"{r['recipe']:<14} {'':>4}  {r['error']}")
            continue
        if r["finished"]:
            state = "finished"
            acc = (f"test {100 * r['test']:.2f} % at best validation {100 * r['val'][1]:.2f} % (iteration {r['val'][0]})"
                   if r["val"] is not None else f"final test {100 * r['final_test']:.2f} %")
        else:
            state = f"at {r['iteration']} / {r['iterations']}"
            acc = (f"last evaluation: validation {100 * r['val'][1]:.2f} %, test {100 * r['test']:.2f} % (iteration "
                   f"{r['val'][0]})" if r["val"] is not None else
                   f"last test {100 * r['test']:.2f} %" if r["test"] is not None else "not evaluated yet")
        resumed = f", went on at {', '.join(map(str, r['resumed_at']))}" if r["resumed_at"] else ""
        lines.append(f"{r['recipe']:<14} {r['seed']:>4}  {state:<18} {acc}; {r['wall_s']:.0f} s{resumed}")
    return "\n".join(lines)
