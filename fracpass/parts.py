"""Models that hold several transformed parts, such as a detector whose backbone, neck and head were
each transformed because the whole model, with its data-dependent post-processing, cannot be captured::

    model.backbone = fracpass.transform(model.backbone, plan, example_inputs=(images,))
    model.head = fracpass.transform(model.head, plan, example_inputs=(feature,))
    fracpass.set_stage(model, 1)            # every part switches
    fracpass.cost(model, (images, targets))  # the parts' costs summed, per call of each part

The public entry points in ``fracpass.api`` accept such a model and come here for the parts.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from fracpass.costreport import CostReport, GateCost, OpCost
from fracpass.errors import FracpassError, PlanError

__all__ = ["transform_parts", "transformed_parts", "common_stages", "parts_stage", "parts_plan", "parts_cost",
           "parts_schedule", "parts_summary"]

Parts = List[Tuple[str, nn.Module]]


def transformed_parts(model: nn.Module) -> Parts:
    """(path, module) of the outermost models returned by ``fracpass.transform`` inside ``model``;
    ``[("", model)]`` for a transformed model itself, ``[]`` when there is none."""
    from fracpass.state import ModelState as _State

    found: Parts = []
    for name, module in model.named_modules():
        if any(name.startswith(path + ".") or not path for path, _ in found):
            continue  # inside a part: its own submodules are the part's business
        if isinstance(module.__dict__.get("fracpass"), _State):
            found.append((name, module))
    return found


def transform_parts(model: nn.Module, plan, example_inputs: Sequence[Any] = (),
                    example_kwargs: Optional[Dict[str, Any]] = None, *, parts: Sequence[str], **options) -> nn.Module:
    """A copy of ``model`` whose submodules ``parts`` (paths such as ``"backbone"``, ``"roi_heads.box_head"``)
    are replaced by ``fracpass.transform`` of each, on the inputs each receives when ``model`` runs
    on the example inputs (its first call; the run leaves no trace). ``model`` is never changed.

    For models that cannot be captured whole (detectors: data-dependent post-processing). ``plan``
    is one Plan for every part or ``{path: Plan}``; ``options`` go to ``transform``
    (``capture_method``, ``leaf_modules``, ``concrete_args``, ``dynamic_batch``).
    """
    from fracpass.api import copy_model, transform
    from fracpass.plan import Plan

    if not isinstance(model, nn.Module):
        raise FracpassError(f"transform_parts: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(parts, str) or not parts:
        raise FracpassError(f"transform_parts: parts={parts!r}; give a list of submodule paths, e.g. "
                            "parts=['backbone', 'head']")
    plans = dict(plan) if isinstance(plan, Mapping) else {path: plan for path in parts}
    if set(plans) != set(parts) or not all(isinstance(p, Plan) for p in plans.values()):
        raise PlanError(f"transform_parts: plan must be a fracpass.Plan or a dict with one Plan for each of "
                        f"{list(parts)}; got {type(plan).__name__}"
                        + (f" with keys {sorted(plans)}" if isinstance(plan, Mapping) else ""))
    for path in parts:
        _check_part(model, path, parts)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    copied = copy_model(model)
    targets = [(path, copied.get_submodule(path)) for path in parts]
    first: Dict[str, Tuple[Tuple[Any, ...], Dict[str, Any]]] = {}
    for path, _, args, kwargs in _record_calls(copied, targets, tuple(example_inputs), dict(example_kwargs or {}),
                                               "transform_parts"):
        first.setdefault(path, (args, kwargs))
    missing = [path for path in parts if path not in first]
    if missing:
        raise FracpassError(f"transform_parts: {type(model).__name__} did not call {', '.join(missing)} on the example "
                            "inputs, so their inputs are unknown; give inputs that reach them, or transform them "
                            "yourself with fracpass.transform(submodule, plan, example_inputs=...)")
    for path, part in targets:
        args, kwargs = first[path]
        parent, _, leaf = path.rpartition(".")
        setattr(copied.get_submodule(parent), leaf, transform(part, plans[path], args, kwargs, **options))
    return copied


def _check_part(model: nn.Module, path: str, parts: Sequence[str]) -> None:
    try:
        model.get_submodule(path)
    except AttributeError as e:
        children = [name for name, _ in model.named_children()]
        raise FracpassError(f"transform_parts: {type(model).__name__} has no submodule {path!r}; its children are "
                            f"{', '.join(children)}") from e
    outer = [other for other in parts if other != path and (path + ".").startswith(other + ".") or other == ""]
    if outer or path == "":
        raise FracpassError(f"transform_parts: part {path!r} is {'the whole model' if path == '' else 'inside ' + outer[0]!r}"
                            "; list parts that do not contain one another")


def _names(parts: Parts) -> str:
    return ", ".join(path or "<root>" for path, _ in parts)


def common_stages(parts: Parts, where: str) -> int:
    """The parts' common number of stages; a PlanError naming them when they differ."""
    counts = {path: part.fracpass.plan.num_stages for path, part in parts}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{path}: {n}" for path, n in counts.items())
        raise PlanError(f"{where}: the transformed parts' plans have different numbers of stages ({listed}), so they "
                        "cannot switch together; transform every part with plans of the same stage count")
    return next(iter(counts.values()))


def parts_stage(parts: Parts) -> int:
    """The stage every part is in; an error naming the parts when they are in different ones."""
    from fracpass.api import current_stage

    stages = {path: current_stage(part) for path, part in parts}
    if len(set(stages.values())) > 1:
        listed = ", ".join(f"{path}: {s}" for path, s in stages.items())
        raise FracpassError(f"current_stage: the transformed parts are in different stages ({listed}); switch them "
                            "together with fracpass.set_stage(model, k) on the model that holds them")
    return next(iter(stages.values()))


def parts_plan(parts: Parts):
    """The plan a Scheduler over all parts follows: the parts' plan when they share their stages
    and switch rule (the first part's, else), an error asking for one when the switch rules differ."""
    common_stages(parts, "Scheduler")
    plans = [part.fracpass.plan for _, part in parts]
    switches = {repr(p.switch) for p in plans}
    if len(switches) > 1:
        raise PlanError(f"Scheduler: the transformed parts ({_names(parts)}) have different switch rules "
                        f"({', '.join(sorted(switches))}); pass the one to follow: fracpass.Scheduler(model, plan)")
    return plans[0]


def parts_schedule(model: nn.Module, parts: Parts, plan, example_inputs, example_kwargs):
    """One StagePlan over all parts: each part's ops (named ``path:op``) with its own plan's bits,
    and a budget resolved from the whole model's per-stage cost."""
    from fracpass.api import cost
    from fracpass.passes.schedule import SchedulePass
    from fracpass.switch import Budget

    stages = common_stages(parts, "schedule")
    plan = plan or parts_plan(parts)
    if plan.num_stages != stages:
        raise PlanError(f"schedule: the plan has {plan.num_stages} stages but the parts were transformed with {stages}; "
                        "transform them with this plan")
    costs = None
    if isinstance(plan.switch, Budget):
        report = cost(model, example_inputs, example_kwargs)
        costs = [report.bitops(k)["total"] for k in range(stages)]
    staged = [(path, SchedulePass(dataclasses.replace(part.fracpass.plan, switch=plan.switch), costs)(part).result)
              for path, part in parts]
    ops = tuple(dataclasses.replace(op, op=f"{path}:{op.op}", module=f"{path}.{op.module}" if op.module else path,
                                    gated=f"{path}:{op.gated}" if op.gated else "")
                for path, one in staged for op in one.ops)
    return dataclasses.replace(staged[0][1], stages=plan.stages, ops=ops)


# -- cost ---------------------------------------------------------------------------------------
def parts_cost(model: nn.Module, parts: Parts, example_inputs: Tuple[Any, ...], example_kwargs: Dict[str, Any],
               target, stage: Optional[int]) -> CostReport:
    """The parts' cost reports as one. With the whole model's example inputs every call of every
    part is costed (a head shared by pyramid levels counts once per level); without, each part once
    on the example inputs it was transformed with."""
    from fracpass.api import cost

    if example_inputs or example_kwargs:
        calls = _record_calls(model, parts, example_inputs, example_kwargs, "cost")
    else:
        calls = [(path, part, (), {}) for path, part in parts]
    called = {path for path, *_ in calls}
    reports = []
    seen: Dict[str, int] = {}
    for path, part, args, kwargs in calls:
        seen[path] = seen.get(path, 0) + 1
        label = path if seen[path] == 1 else f"{path}[{seen[path]}]"
        reports.append((label, path, cost(part, args, kwargs, target=target, stage=stage)))
    if not reports:
        raise FracpassError(f"cost: {type(model).__name__} ran on the example inputs without calling any of its "
                            f"transformed parts ({_names(parts)}); give inputs that reach them")
    merged = _merge(reports)
    merged.not_costed += [(path, "a transformed part the model did not call on the example inputs")
                          for path, _ in parts if path not in called]
    merged.not_costed += _outside(model, parts)
    return merged


def _record_calls(model, parts, example_inputs, example_kwargs, where: str):
    """Run ``model`` once, leaving no trace, and record each part call's arguments (copied: the
    model may modify them in place later)."""
    from fracpass.costing import state_kept

    calls: List[Tuple[str, nn.Module, Tuple[Any, ...], Dict[str, Any]]] = []
    record = lambda m, args, kwargs, path: calls.append(
        (path, m, *tree_map_only(torch.Tensor, torch.Tensor.clone, (tuple(args), dict(kwargs)))))
    hooks = [part.register_forward_pre_hook(lambda m, a, k, path=path: record(m, a, k, path), with_kwargs=True)
             for path, part in parts]
    from fracpass.state import ModelState as _State

    hubs = [part.gates for _, part in parts if isinstance(part.__dict__.get("fracpass"), _State) and _has_gates(part)]
    try:
        with state_kept(model), contextlib.ExitStack() as stack:
            for hub in hubs:
                stack.enter_context(hub.keeping_choices())
            model(*example_inputs, **example_kwargs)
    except Exception as e:
        raise FracpassError(f"{where}: running {type(model).__name__} on the example inputs (to find each part's "
                            f"inputs) failed: {type(e).__name__}: {e}. Give the inputs the model takes"
                            + (", or none to cost each part on the inputs it was transformed with" if where == "cost"
                               else "") + ".") from e
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _has_gates(part: nn.Module) -> bool:
    from fracpass.api import gate_hub

    return gate_hub(part) is not None


def _merge(reports: List[Tuple[str, str, CostReport]]) -> CostReport:
    first = reports[0][2]
    ops: List[OpCost] = []
    not_costed: List[Tuple[str, str]] = []
    for label, path, report in reports:
        scale = first.batch / report.batch  # MACs are per batch of the example inputs; one batch size for all
        for op in report.ops:
            ops.append(dataclasses.replace(
                op, op=f"{label}:{op.op}", module=f"{path}.{op.module}" if op.module else path,
                gated=f"{label}:{op.gated}" if op.gated else "", forward_macs=op.forward_macs * scale,
                backward_macs=tuple(m * scale for m in op.backward_macs),
                operand_elems=tuple(e * scale for e in op.operand_elems), out_elems=op.out_elems * scale))
        not_costed += [(f"{label}:{name}", why) for name, why in report.not_costed]
    merged = CostReport(ops, first.batch, first.num_stages, first.stage, first.target, not_costed)
    merged._symbolic = _no_symbolic
    merged.gates = _merge_gates(reports, merged)
    return merged


def _no_symbolic():
    raise FracpassError("symbolic: the report sums several transformed parts whose inputs have their own sizes; "
                        "ask each part: fracpass.cost(model.backbone).symbolic('total')")


def _merge_gates(reports, merged: CostReport) -> Optional[GateCost]:
    """One GateCost over the gated parts; each unit's option costs rescaled from % of its part's
    FP32 BitOPs to % of the whole model's."""
    gated = [(label, r) for label, _, r in reports if r.gates is not None]
    if not gated:
        return None
    options = {r.gates.options for _, r in gated}
    if len(options) > 1:
        raise FracpassError(f"cost: the gated parts ({', '.join(l for l, _ in gated)}) have different gate options "
                            f"({' vs '.join(map(str, sorted(options)))}), which one table cannot show; cost each part: "
                            "fracpass.cost(model.backbone)")
    whole = merged.fp32_bitops()["total"] or 1
    unit_costs, mix = {}, {}
    for label, r in gated:
        share = r.fp32_bitops()["total"] / whole
        for unit, costs in r.gates.unit_costs.items():
            unit_costs[f"{label}:{unit}"] = tuple(c * share for c in costs)
            mix[f"{label}:{unit}"] = r.gates.mix[unit]
    sources = sorted({r.gates.mix_source for _, r in gated})
    return GateCost(options.pop(), unit_costs, mix, " / ".join(sources),
                    sum(r.gates.gate_macs_per_sample for _, r in gated),
                    sum(r.gates.gate_bitops_per_sample for _, r in gated))


def _outside(model: nn.Module, parts: Parts) -> List[Tuple[str, str]]:
    """Modules with parameters outside every part: they run at full precision and are not costed."""
    inside = lambda name: any(name == path or name.startswith(path + ".") for path, _ in parts)
    return [(name, f"{type(m).__name__} outside the transformed parts: full precision, not costed")
            for name, m in model.named_modules()
            if name and not inside(name) and any(True for _ in m.parameters(recurse=False))]


# -- summary ------------------------------------------------------------------------------------
def parts_summary(model: nn.Module, parts: Parts) -> str:
    from fracpass.api import summary

    lines = [f"fracpass: {type(model).__name__} holds {len(parts)} transformed parts: {_names(parts)}"]
    for path, part in parts:
        lines += ["", f"[{path}]", summary(part)]
    outside = _outside(model, parts)
    if outside:
        lines += ["", f"outside the transformed parts (full precision, not costed): "
                      f"{', '.join(name for name, _ in outside)}"]
    return "\n".join(lines)
