"""Train one recipe with one seed and record what its cost accounting needs, step by step.

A run records per iteration the training loss, the stage in force and, for gated recipes, how many
samples of the batch chose each option in each gated unit (and the controller's batch cost); the
stage switches; test accuracy (and validation accuracy, where the data set holds a validation
split) every ``eval_every`` iterations; and its wall time. Its costs come from ``Accounting`` over
exactly that history.

The "best" iteration is selected on validation accuracy only (``select_best``): the test set is
evaluated at the same points and reported, never selected on. A data set without a validation
split selects nothing (``best_iteration`` is None).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

import fracpass
from fracpass.errors import FracpassError
from fracpass.experiments.accounting import PAPER, WHOLE, Accounting
from fracpass.experiments.data import ImageSet
from fracpass.experiments.model import SmallResNet
from fracpass.experiments.recipes import Config, exclusions, gate_targets, plan_for, warn_unreachable

__all__ = ["train_run", "build", "accounting_for", "select_best", "learning_rate", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1  # of the within-run checkpoints train_run writes and resumes from

log = logging.getLogger("fracpass.experiments")


def _network(cfg: Config, data: ImageSet) -> torch.nn.Module:
    return SmallResNet(data.in_channels, data.num_classes, n=cfg.blocks, width=cfg.width, shortcut=cfg.shortcut)


def build(recipe: str, cfg: Config, data: ImageSet, seed: int):
    """(model to train, plan or None, gate targets in the controller's units or None) for a recipe and seed."""
    torch.manual_seed(seed)
    model = _network(cfg, data)
    plan = plan_for(recipe, cfg)
    if plan is None:
        return model, None, None
    example = data.x_train[:cfg.batch_size]
    targets = None
    if plan.gates is not None:
        # the controller steers the whole model's cost; convert the paper-accounting targets first. The
        # conversion needs only which ops are excluded and their MACs, so the probe leaves the gates out:
        # with them, insert-gates would check the unconverted targets and warn about targets that the
        # converted ones reach (the transform below checks those)
        probe = fracpass.transform(model, dataclasses.replace(plan, gates=None), example_inputs=(example,))
        targets = gate_targets(plan, fracpass.cost(probe))
        plan = dataclasses.replace(plan, gates=dataclasses.replace(plan.gates, target=targets))
        torch.manual_seed(seed)  # the gates' initial weights do not depend on the probe
    qmodel = fracpass.transform(model, plan, example_inputs=(example,), execution=cfg.execution)
    return qmodel, plan, targets


def accounting_for(recipe: str, model, cfg: Config, data: ImageSet, profiles=()) -> Accounting:
    """The cost vectors of a recipe's model. FP32 is costed on the same network transformed with
    every op at 32 bits (the stem and classifier marked full precision, as in the other recipes)."""
    example = data.x_train[:cfg.batch_size]
    if recipe == "fp32":
        model = fracpass.transform(model, fracpass.Plan.static(32, 32, 32, exclude=exclusions(cfg, gated=False)),
                                   example_inputs=(example,))
    return Accounting.from_model(model, example, profiles)


def select_best(val_evals: Optional[List[List[float]]]) -> Optional[int]:
    """The iteration of the best validation accuracy (the first, on ties); None without validation.
    Test accuracy plays no part: it is read off at the iteration chosen here."""
    if not val_evals:
        return None
    return int(max(val_evals, key=lambda e: (e[1], -e[0]))[0])


def learning_rate(cfg: Config, it: int) -> float:
    """The factor on ``cfg.lr`` at iteration ``it``, the same for every recipe."""
    if cfg.lr_schedule == "piecewise":  # FracTrain's: x0.1 at 32k and 48k of 64k iterations
        return 0.1 ** ((it >= cfg.iterations // 2) + (it >= 3 * cfg.iterations // 4))
    return 0.5 * (1 + math.cos(math.pi * it / cfg.iterations))  # cosine to zero


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 500) -> float:
    model.eval()
    try:
        correct = sum(int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum()) for i in range(0, len(y), chunk))
    finally:
        model.train()
    return correct / len(y)


def _save_progress(path: Path, it: int, model, opt, lr_sched, sched, order_gen, order, history, wall_s: float,
                   recipe: str, seed: int, settings: Dict[str, Any]) -> None:
    """Everything the loop needs to go on from iteration ``it`` as if it had never stopped: the
    model, optimiser, learning-rate and precision schedules, the batch order and torch's generator
    (the stochastic rounding's noise), and the history so far. Written beside, then moved into place,
    so a process killed while writing leaves the previous checkpoint whole."""
    state = {"format": CHECKPOINT_FORMAT, "recipe": recipe, "seed": seed, "settings": settings, "iteration": it,
             "model": model.state_dict(), "optimizer": opt.state_dict(), "lr_schedule": lr_sched.state_dict(),
             "scheduler": sched.state_dict() if sched is not None else None,
             "order_generator": order_gen.get_state(), "order": order, "rng": torch.get_rng_state(),
             "history": history, "wall_s": wall_s}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_progress(path: Path, recipe: str, seed: int, settings: Dict[str, Any], model, opt, lr_sched, sched,
                   order_gen) -> Dict[str, Any]:
    state = torch.load(path, weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("recipe") != recipe or state.get("seed") != seed:
        raise FracpassError(f"{path}: a checkpoint of {state.get('recipe')!r} seed {state.get('seed')} (format "
                            f"{state.get('format')}), not of {recipe!r} seed {seed} (format {CHECKPOINT_FORMAT}); "
                            "delete it to train this run from its start")
    if state["settings"] != settings:
        diff = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
        raise FracpassError(f"{path}: saved with other settings {diff} (saved, now); use the same settings, or "
                            "delete it to train this run from its start")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_schedule"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    order_gen.set_state(state["order_generator"])
    torch.set_rng_state(state["rng"])
    return state


def train_run(recipe: str, cfg: Config, data: ImageSet, seed: int, profiles=(), bar=None,
              checkpoint: Optional[Path] = None, checkpoint_every: Optional[int] = None) -> Dict[str, Any]:
    """Train ``recipe`` on ``data`` with ``seed``; returns the run's record (JSON-ready) and costs.

    With ``checkpoint`` (a file path), the run's progress is saved there every ``checkpoint_every``
    iterations (default: every evaluation), and a run that finds the file goes on from it: the
    record is the same, bit for bit, as one trained without stopping (its wall time is the sum of
    the parts'; ``resumed_at`` lists where it went on). The caller deletes the file once the record
    is kept."""
    start = time.perf_counter()
    model, plan, ctrl_targets = build(recipe, cfg, data, seed)
    acct = accounting_for(recipe, model, cfg, data, profiles)
    gated = plan is not None and plan.gates is not None
    cheapest = warn_unreachable(model.gates, ctrl_targets, recipe) if gated else None
    sched = fracpass.Scheduler(model) if plan is not None else None
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: learning_rate(cfg, i))
    order_gen = torch.Generator().manual_seed(seed)  # batch order: the same for every recipe of a seed
    n, b = len(data.y_train), cfg.batch_size
    per_epoch = n // b
    checkpoint_every = checkpoint_every or cfg.eval_every
    settings = {**cfg.to_dict(), "data": data.describe()}
    history: Dict[str, list] = {
        "losses": [], "stages": [], "counts": [], "ctrl_cost": [],
        "evals": [],  # [iteration, test accuracy]
        "val_evals": [],  # [iteration, validation accuracy]
        "resumed_at": []}
    order = None
    first, wall_before = 0, 0.0
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if checkpoint.is_file():
            saved = _load_progress(checkpoint, recipe, seed, settings, model, opt, lr_sched, sched, order_gen)
            first, order, history, wall_before = saved["iteration"], saved["order"], saved["history"], saved["wall_s"]
            history["resumed_at"].append(first)
            log.info("%s seed %d: going on from iteration %d of %d (%s)", recipe, seed, first, cfg.iterations,
                     checkpoint)
            if bar is not None:
                bar.update(first)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    losses, stages, counts, ctrl_cost = history["losses"], history["stages"], history["counts"], history["ctrl_cost"]
    evals, val_evals = history["evals"], history["val_evals"]
    model.train()
    for it in range(first, cfg.iterations):
        if it % per_epoch == 0:
            order = torch.randperm(n, generator=order_gen)
        idx = order[(it % per_epoch) * b:(it % per_epoch + 1) * b]
        x, y = data.x_train[idx], data.y_train[idx]
        stage = sched.stage if sched is not None else 0
        loss = F.cross_entropy(model(x), y)
        total = loss + fracpass.gate_loss(model) if gated else loss
        if gated:
            stats = fracpass.gate_stats(model)
            counts.append([[int(round(p * len(idx))) for p in mix] for mix in stats.units.values()])
            ctrl_cost.append(stats.mean_cost)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
        stages.append(stage)
        if sched is not None:
            sched.step(loss.detach())
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations:
            evals.append([it + 1, evaluate(model, data.x_test, data.y_test)])
            if data.has_validation:
                val_evals.append([it + 1, evaluate(model, data.x_val, data.y_val)])
        if bar is not None:
            bar.update(1)
            if (it + 1) % 10 == 0:
                bar.set_postfix_str(f"loss {losses[-1]:.3f} stage {stage}" + (f" acc {evals[-1][1]:.3f}" if evals else ""))
        if checkpoint is not None and (it + 1) % checkpoint_every == 0 and it + 1 < cfg.iterations:
            _save_progress(checkpoint, it + 1, model, opt, lr_sched, sched, order_gen, order, history,
                           wall_before + time.perf_counter() - start, recipe, seed, settings)
    wall = wall_before + time.perf_counter() - start
    step_costs = acct.steps(stages, b, np.asarray(counts) if gated else None) if recipe != "fp32" \
        else acct.fp32_steps(cfg.iterations, b)
    cumulative = np.cumsum(step_costs, axis=0)
    best_it = select_best(val_evals)
    test_at = dict((int(i), a) for i, a in evals)
    record: Dict[str, Any] = {
        "recipe": recipe, "seed": seed, "dataset": cfg.dataset, "iterations": cfg.iterations, "batch_size": b,
        "execution": cfg.execution, "stem": cfg.stem, "shortcut": cfg.shortcut,
        "excluded": list(exclusions(cfg, gated)) if plan is not None else [],
        "final_accuracy": evals[-1][1], "evals": evals, "val_evals": val_evals,
        "selected_on": "validation" if best_it is not None else None, "best_iteration": best_it,
        "best_val_accuracy": dict((int(i), a) for i, a in val_evals)[best_it] if best_it is not None else None,
        "test_at_best": test_at[best_it] if best_it is not None else None,
        "losses": losses, "stages": stages,
        "switches": [[int(i), int(old), int(new)] for i, old, new, _ in (sched.history if sched else [])],
        "cost_vector": ["paper_bitops", "whole_bitops"] + [f"latency_s:{t}" for t in acct.targets]
                       + [f"energy_j:{t}" for t in acct.targets],
        "total": cumulative[-1].tolist(),
        "up_to_best": cumulative[best_it - 1].tolist() if best_it is not None else None,
        "fp32_total": (cfg.iterations * b * acct.fp32).tolist(),
        "cumulative_at_evals": {"paper": [float(cumulative[int(i) - 1, PAPER]) for i, _ in evals],
                                "whole": [float(cumulative[int(i) - 1, WHOLE]) for i, _ in evals]},
        "wall_s": wall, "threads": torch.get_num_threads(), "resumed_at": history["resumed_at"],
    }
    if gated:
        record["gates"] = {
            "units": list(acct.units), "options": [list(o) for o in acct.options],
            "paper_targets": list(plan_for(recipe, cfg).gates.targets(plan.num_stages)),
            "controller_targets": list(ctrl_targets), "controller_cheapest": list(cheapest),
            "counts": counts, "controller_cost": ctrl_cost,
        }
    return record
