"""The public entry points: transform, set_stage, current_stage, quantizers, summary."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import itertools
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from torch import nn

from fracpass import meta
from fracpass.capture import CaptureOptions, capture
from fracpass.errors import FracpassError, PlanError
from fracpass.pipeline import default_pipeline
from fracpass.plan import Plan
from fracpass.quant import FULL_PRECISION, Quantizer, warn_nonfinite
from fracpass.checkpoint import check_plan_state
from fracpass.native.options import NativeOptions, check_execution, check_options
from fracpass.state import ModelState, is_transformed, model_state

__all__ = ["transform", "set_stage", "current_stage", "quantizers", "summary", "cost", "gate_loss", "gate_stats",
           "QuantizedGraphModule"]

log = logging.getLogger("fracpass")


class QuantizedGraphModule(torch.fx.GraphModule):
    """A GraphModule whose ``.train()`` / ``.eval()`` also switch to a graph captured in that mode.

    Capture bakes the mode into the graph (dropout flags, batch-norm statistics, Python
    ``if self.training`` branches); the other mode's graph is captured on first use, run through
    the same passes, and reuses the same quantizer modules, so ranges and bits are shared.
    """

    def train(self, mode: bool = True):
        state: Optional[ModelState] = self.__dict__.get("fracpass")
        if state is not None and state.graph_mode != mode:
            self._use_mode(state, mode)
        # after the switch: re-capture toggles the root's mode, and on the fx path the root's
        # submodules are this module's submodules
        super().train(mode)
        if not mode:  # entering eval reads the quantizers' non-finite counts back (once per switch)
            warn_nonfinite(self.named_modules())
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, refusing a checkpoint saved under another plan (``PlanError``)."""
        check_plan_state(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)
        state = self.__dict__.get("fracpass")
        if state is not None:
            # same memo: the copy's state refers to the copy's graph, modules and parameters
            copied.__dict__["fracpass"] = copy.deepcopy(state, memo)
        return copied

    def __reduce__(self):
        """Pickle the recipe (model, plan, example inputs, capture options) and the state_dict;
        unpickling transforms again, so the generated code never has to be pickled."""
        state = self.__dict__.get("fracpass")
        if state is None:
            return super().__reduce__()
        return (_rebuild, (state.root, state.plan, state.args, state.kwargs, state.options, self.state_dict(),
                           self.training, state.execution, state.native))

    def recompile(self):
        # FSDP2's fully_shard re-classes the module as FSDP<cls>(FSDPModule, cls); fx's recompile on that
        # class would install a second __call__ wrapper whose super() call lands on the first: infinite
        # recursion at the next call. Recompile on the class fx generated, which the wrapper inherits from.
        cls = type(self)
        owner = next((c for c in cls.__mro__ if "_wrapped_call" in vars(c)), cls)
        if owner is cls:
            return super().recompile()
        self.__class__ = owner
        try:
            return super().recompile()
        finally:
            self.__class__ = cls

    def _use_mode(self, state: ModelState, mode: bool, recapture: bool = False) -> None:
        graph = state.graphs.get(mode)
        if graph is None or recapture:
            with _gc_paused(), _unsharded(self):
                _capture_into(self, state, mode)
            # the modules the capture made (quantizers, gates) in the model's mode: a re-capture outside
            # train() (fracpass.native.configure, state.simulated_copy) left an eval model's new ones training
            nn.Module.train(self, mode)
        else:
            self.graph = graph  # the setter recompiles
        state.graph_mode = mode


def transform(
    model: nn.Module,
    plan: Plan,
    example_inputs: Sequence[Any] = (),
    example_kwargs: Optional[Dict[str, Any]] = None,
    *,
    capture_method: str = "auto",
    leaf_modules: Sequence[Union[str, type]] = (),
    concrete_args: Optional[Dict[str, Any]] = None,
    dynamic_batch: bool = True,
    execution: str = "simulate",
    native: Optional[NativeOptions] = None,
) -> QuantizedGraphModule:
    """Capture ``model`` and insert the quantizers ``plan`` asks for. ``model`` is never changed.

    ``capture_method``: "auto" (torch.fx, falling back to non-strict torch.export), "fx" or "export".
    Export needs ``example_inputs`` and/or ``example_kwargs``; its batch dimension stays dynamic.
    ``execution``: "simulate" (float32 fake quantization) or "native" (linear/matmul products on int8
    codes and convolutions on bfloat16 codes where the current bits allow, else simulated; see
    ``fracpass.native``). ``native``: a ``fracpass.NativeOptions`` (thresholds, kinds, the int8
    sub-products, the fused BatchNorm) for ``execution="native"``; the model keeps it, so re-capture,
    deepcopy and pickling build the same graph (default: ``NativeOptions()``).
    """
    if not isinstance(model, nn.Module):
        raise FracpassError(f"transform: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise PlanError(f"transform: plan must be a fracpass.Plan, got {type(plan).__name__}; "
                        "build one with fracpass.Plan.static(...), Plan.progressive(...) or Plan.load(path)")
    _refuse_transformed(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    execution = check_execution(execution)
    native = check_options(native, execution)
    options = CaptureOptions(capture_method, tuple(leaf_modules), concrete_args, dynamic_batch)
    with _gc_paused():
        return _transform(model, plan, tuple(example_inputs), example_kwargs, options, execution, native)


def _refuse_transformed(model: nn.Module) -> None:
    """Transforming twice would quantize the quantizers' own ops and count every op twice: refuse it."""
    from fracpass.parts import transformed_parts

    parts = transformed_parts(model)
    if not parts:
        return
    path, part = parts[0]
    if not path:
        original = type(part.fracpass.root).__name__
        raise PlanError(f"transform: this {original} is already transformed by fracpass; "
                        "to change its precision use fracpass.set_stage(qmodel, stage), to apply another plan "
                        "transform the original model again (transform never changes it)")
    where = ", ".join(repr(p) for p, _ in parts)
    raise PlanError(f"transform: {type(model).__name__} contains a model already transformed by fracpass at {where}; "
                    "transform a copy that holds the original submodules instead, or keep the transformed parts and "
                    "drive them together with fracpass.set_stage(model, stage) and fracpass.Scheduler(model)")


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: transform allocates many small objects and no cycles
    worth collecting, and collections scanning the growing heap cost ~25% on ResNet-1202."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _transform(model: nn.Module, plan: Plan, example_inputs: Tuple[Any, ...], example_kwargs, options,
               execution: str = "simulate", native: Optional[NativeOptions] = None) -> "QuantizedGraphModule":
    root = copy_model(model)
    captured = capture(root, example_inputs, example_kwargs, options, module_class=QuantizedGraphModule)
    gm = captured.graph_module
    # re-captures (the other mode) take the path that worked, not "auto"
    state = ModelState(plan, dataclasses.replace(options, method=captured.method), captured.method, root,
                   example_inputs, dict(example_kwargs or {}), graph_mode=root.training, notes=captured.notes,
                   execution=execution, native=native if native is not None else check_options(None, execution))
    _run_pipeline(gm, state, root.training)
    _follow_device(gm, root)
    # after the pipeline, so the quantizers it added follow too; nn.Module.train does not re-capture
    nn.Module.train(gm, root.training)
    _order_like(gm, root)
    gm.fracpass = state
    set_stage(gm, 0)
    return gm


def _follow_device(gm: nn.Module, root: nn.Module) -> None:
    """Put the modules the pipeline added (quantizers, gates: made on the CPU) on the model's device when
    all of the model's parameters and buffers lie on one, so a CUDA model comes back a CUDA model. A
    model spread over devices keeps them where they are (move them with the part they serve)."""
    devices = {t.device for t in (*root.parameters(), *root.buffers())}
    if len(devices) == 1 and next(iter(devices)).type != "cpu":
        gm.to(next(iter(devices)))


def _rebuild(root, plan, args, kwargs, options: CaptureOptions, state_dict, training: bool,
             execution: str = "simulate", native: Optional[NativeOptions] = None) -> QuantizedGraphModule:
    qmodel = transform(root.train(training), plan, args, kwargs, capture_method=options.method,
                       leaf_modules=options.leaf_modules, concrete_args=options.concrete_args,
                       dynamic_batch=options.dynamic_batch, execution=execution,
                       native=native if execution == "native" else None)
    qmodel.load_state_dict(state_dict)
    return qmodel


@contextlib.contextmanager
def _unsharded(module: nn.Module):
    """Full parameters while a mode is captured under FSDP2 (``fully_shard``): the capture and the
    passes run the model on its example inputs, which a sharded (DTensor) parameter refuses.
    Every rank switches mode together, as ``unshard`` gathers over the process group."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        yield
        return
    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, with plain parameters and buffers cloned up front (~20% faster).

    Seeding deepcopy's memo keeps tied weights tied; tensors of other types or carrying extra
    attributes take deepcopy's own path.
    """
    memo: Dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo or t.__dict__ or type(t) not in (nn.Parameter, torch.Tensor):
            continue
        clone = t.detach().clone()
        memo[id(t)] = nn.Parameter(clone, t.requires_grad) if type(t) is nn.Parameter else clone
    return copy.deepcopy(model, memo)


def _run_pipeline(gm: QuantizedGraphModule, state: ModelState, mode: bool) -> None:
    native = state.native if state.execution == "native" else None
    result = default_pipeline(state.plan, state.args, state.kwargs, native=native)(gm)
    state.graphs[mode] = gm.graph
    state.stats[mode] = result.stats


def _capture_into(gm: QuantizedGraphModule, state: ModelState, mode: bool) -> None:
    """Capture ``state.root`` in ``mode`` and make it ``gm``'s graph, sharing gm's modules."""
    was = state.root.training
    state.root.train(mode)
    try:
        fresh = capture(state.root, state.args, state.kwargs, state.options).graph_module
    finally:
        state.root.train(was)
    for node in fresh.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            _adopt(gm, fresh, str(node.target))
    gm.graph = fresh.graph
    _run_pipeline(gm, state, mode)
    before = _compute_ops(state.graphs[not mode]) if (not mode) in state.graphs else None
    after = _compute_ops(gm.graph)
    if before is not None and before != after:
        log.warning("the %s-mode graph has different compute ops than the %s-mode one (%s); quantizers of ops "
                    "found in only one mode keep their own ranges", "train" if mode else "eval",
                    "eval" if mode else "train", sorted(set(before) ^ set(after))[:5])
    # set_stage applies to quantizers created for this mode too
    set_stage(gm, current_stage(gm))


def _adopt(gm: nn.Module, source: nn.Module, target: str) -> None:
    """Give ``gm`` the attribute ``target`` from ``source`` unless it already has it."""
    owner_gm, owner_src = gm, source
    *path, leaf = target.split(".")
    for part in path:
        if not hasattr(owner_gm, part):
            owner_gm.add_module(part, nn.Module())
        owner_gm, owner_src = getattr(owner_gm, part), getattr(owner_src, part)
    if not hasattr(owner_gm, leaf):
        value = getattr(owner_src, leaf)
        if isinstance(value, nn.Module):
            owner_gm.add_module(leaf, value)
        elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            owner_gm.register_buffer(leaf, value)
        else:
            setattr(owner_gm, leaf, value)


def _order_like(module: nn.Module, original: nn.Module) -> None:
    """Put submodules, parameters and buffers back in ``original``'s order (quantizers last).

    GraphModule adds them in the order the graph uses them; an optimizer state saved from the
    original model indexes parameters by that model's order.
    """
    for attr in ("_modules", "_parameters", "_buffers"):
        current, reference = getattr(module, attr), list(getattr(original, attr))
        rank = {name: i for i, name in enumerate(reference)}
        ordered = sorted(current, key=lambda name: rank.get(name, len(rank)))
        if ordered != list(current):
            setattr(module, attr, {name: current[name] for name in ordered})
    for name, child in module._modules.items():
        counterpart = original._modules.get(name)
        if child is not None and counterpart is not None and child is not counterpart:
            _order_like(child, counterpart)


def _compute_ops(graph: torch.fx.Graph) -> List[Tuple[str, str]]:
    return [(n.name, meta.op_info(n).kind) for n in graph.nodes if meta.op_info(n) is not None]




def parts_of(model: nn.Module) -> Optional[List[Tuple[str, nn.Module]]]:
    """None for a transformed model; else the transformed parts it holds (``fracpass.parts``), which
    the entry points below treat as one model."""
    if is_transformed(model):
        return None
    from fracpass.parts import transformed_parts

    parts = transformed_parts(model) if isinstance(model, nn.Module) else []
    if not parts:
        raise FracpassError(f"{type(model).__name__} is not a model returned by fracpass.transform() and holds no "
                            "transformed part; transform it first: qmodel = fracpass.transform(model, plan, "
                            "example_inputs=(x,)), or, if it cannot be captured whole, its parts: "
                            "model.backbone = fracpass.transform(model.backbone, plan, example_inputs=(x,)) "
                            "(fracpass.transform_parts finds each part's example inputs)")
    return parts


def example_args(state: ModelState, example_inputs, example_kwargs) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """The example inputs a call was given, else the ones given to transform (a bare tensor is one input)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not example_inputs and not example_kwargs:
        return state.args, state.kwargs
    return tuple(example_inputs), dict(example_kwargs or {})


def quantizers(qmodel: nn.Module) -> Iterator[Tuple[str, Quantizer]]:
    """(name, module) of every quantizer in a transformed model (or in its transformed parts)."""
    parts_of(qmodel)
    return ((name, m) for name, m in qmodel.named_modules() if isinstance(m, Quantizer))


def set_stage(qmodel: nn.Module, stage: int) -> None:
    """Switch every quantizer to the plan's ``stage`` (negative counts from the end). No re-trace."""
    parts = parts_of(qmodel)
    if parts is not None:  # a model holding transformed parts: they switch together
        from fracpass.parts import common_stages

        common_stages(parts, "set_stage")
        for _, part in parts:
            set_stage(part, stage)
        return
    state = model_state(qmodel)
    n = state.plan.num_stages
    if isinstance(stage, bool) or not isinstance(stage, int) or not -n <= stage < n:
        raise PlanError(f"set_stage: stage {stage!r} is out of range; the plan has {n} stage(s): 0..{n - 1} "
                        f"(or -{n}..-1 from the end)")
    stage %= n
    for _, q in quantizers(qmodel):
        q.set_stage(stage)
    hub = gate_hub(qmodel)
    if hub is not None:
        hub.set_stage(stage)  # the cost target follows the stage
    state.stage = stage


def gate_hub(qmodel: nn.Module):
    from fracpass.gating import GateHub

    hub = getattr(qmodel, "gates", None)
    return hub if isinstance(hub, GateHub) else None


def gate_loss(qmodel: nn.Module) -> torch.Tensor:
    """DFQ's cost regulariser for the last forward: ``beta * sign(cp - target) * cost`` (or the
    plan's smooth controller), cost being the batch's summed per-sample relative cost in % of FP32.
    Add it to the task loss before ``backward()``. A zero tensor for a model without gates; the sum
    of the parts' regularisers for a model holding transformed parts."""
    parts = parts_of(qmodel)
    if parts is not None:
        losses = [gate_loss(part) for _, part in parts]
        return sum(losses[1:], losses[0])
    hub = gate_hub(qmodel)
    if hub is None:
        return torch.zeros(())
    if hub.sample_costs() is None:
        raise FracpassError("gate_loss: no batch has gone through the gates yet; call it after the forward pass "
                            "(loss = criterion(qmodel(x), y) + fracpass.gate_loss(qmodel))")
    return hub.loss()


def gate_stats(qmodel: nn.Module):
    """The gates' choices on the last batch (``fracpass.gating.GateStats``): per unit the fraction
    of samples per option, the mean relative cost and the target in force; None before any batch."""
    parts = parts_of(qmodel)
    if parts is not None:
        gated = [path for path, part in parts if gate_hub(part) is not None] or [parts[0][0]]
        raise FracpassError(f"gate_stats: {type(qmodel).__name__} holds several transformed parts "
                            f"({', '.join(path for path, _ in parts)}), each with its own gates; ask a part: "
                            f"fracpass.gate_stats(model.{gated[0]})")
    hub = gate_hub(qmodel)
    if hub is None:
        raise FracpassError("gate_stats: this model has no gates; transform it with a plan that has them, "
                            "e.g. fracpass.Plan.static(w=4, a=8, g=8).with_gates(fracpass.Gates())")
    return hub.stats()


def current_stage(qmodel: nn.Module) -> int:
    """The stage the quantizers are in (after load_state_dict, the loaded one)."""
    parts = parts_of(qmodel)
    if parts is not None:
        from fracpass.parts import parts_stage

        return parts_stage(parts)
    state = model_state(qmodel)
    for _, q in quantizers(qmodel):
        return int(q.stage)  # state_dict carries the stage in every quantizer
    return state.stage


def summary(qmodel: nn.Module) -> str:
    """A table of every compute op: kind, module, bits per role at the current stage, gating, exclusion."""
    parts = parts_of(qmodel)
    if parts is not None:
        from fracpass.parts import parts_summary

        return parts_summary(qmodel, parts)
    state = model_state(qmodel)
    stage = current_stage(qmodel)
    native = state.execution == "native"
    paths = {}
    if native:
        from fracpass.native import op_paths

        paths = op_paths(qmodel)
    rows = [("op", "kind", "module", "w", "a", "g", "gated", "status") + (("path",) if native else ())]
    counts = {"quantized": 0, "excluded": 0}
    for node in qmodel.graph.nodes:
        info, spec = meta.op_info(node), meta.qspec(node)
        if info is None or spec is None:
            continue
        if spec.excluded:
            bits, status = ("-", "-", "-"), f"excluded: {spec.excluded}"
            counts["excluded"] += 1
        else:
            bits = tuple(_bits_cell(spec.stage_bits(f)[stage]) for f in ("w", "a", "g"))
            if not info.weight_args and not info.module_weight:
                bits = ("-",) + bits[1:]  # nothing to quantize: no parameter operand
            status = "quantized" if any(b not in ("-", "fp32") for b in bits) else "full precision"
            counts["quantized"] += status == "quantized"
        unit = meta.gated(node)
        if unit is not None and not spec.excluded:
            bits = (bits[0], _options_cell(state.plan.gates.a), _options_cell(state.plan.gates.g, state.plan.gates.a))
        rows.append((node.name, info.kind + ("/" + ",".join(info.traits) if info.traits else ""),
                     info.module_path or "<root>", *bits, unit or "no", status)
                    + ((paths.get(node.name, ("simulated", ""))[0],) if native else ()))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [f"fracpass: {type(qmodel).__name__} captured with {state.method}; stage {stage} of "
             f"{state.plan.num_stages} (w/a/g = {stage_text(state.plan, stage)})"]
    lines += [f"  note: {note}" for note in state.notes]
    for i, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    n_q = sum(1 for _ in quantizers(qmodel))
    lines.append(f"{len(rows) - 1} compute ops: {counts['quantized']} quantized, {counts['excluded']} excluded; "
                 f"{n_q} quantizer modules")
    if native:  # execution="native": what runs natively at this stage, and why the rest does not
        lines += [f"  path of {name}: {path}{': ' + why if why else ''}" for name, (path, why) in paths.items()
                  if path == "simulated" or why]
    hub = gate_hub(qmodel)
    if hub is not None:
        gates = state.plan.gates
        lines.append(f"gates: {len(hub.unit_names)} units ({gates.granularity}), options a/g "
                     f"{', '.join(f'{a}/{g}' if a else 'skip' for a, g in zip(gates.a, gates.g))}, w={gates.w}, "
                     f"target {hub.target:g}% of FP32 at this stage")
        from fracpass.passes.insert_gates import unit_summary

        for name, ops in unit_summary(qmodel):
            lines.append(f"  unit {name}: {', '.join(ops)}")
        ungated = state.stats.get(state.graph_mode, {}).get("find-gated-units", {}).get("ungated_attention_units", ())
        if ungated:  # residuals find-gated-units left out: their ops run inside nn.MultiheadAttention
            lines.append(f"  left ungated: {', '.join(ungated)} (their ops run inside nn.MultiheadAttention, "
                         "sequence-first: a gate cannot choose per sample; they keep the stage's bits)")
    return "\n".join(lines)


def _options_cell(bits: Sequence[int], a: Optional[Sequence[int]] = None) -> str:
    """The distinct bit widths of the gates' options, leaving out skip options (a = 0)."""
    a = bits if a is None else a
    return "{" + ",".join(map(str, sorted({b for b, ak in zip(bits, a) if ak}))) + "}"


def _bits_cell(bits: int) -> str:
    return "fp32" if bits >= FULL_PRECISION else str(bits)


def stage_text(plan: Plan, stage: int) -> str:
    s = plan.stages[stage]
    return f"{_bits_cell(s.w)}/{_bits_cell(s.a)}/{_bits_cell(s.g)}"


def cost(qmodel: nn.Module, example_inputs: Sequence[Any] = (), example_kwargs: Optional[Dict[str, Any]] = None, *,
         target=None, stage: Optional[int] = None):
    """A CostReport: MACs per op, BitOPs per stage, and with ``target`` energy and latency.

    The example inputs default to the ones given to ``transform``. ``target`` is a built-in profile
    name (``fracpass.targets.available_targets()``), a path to a profile TOML, or a Target.
    For a model holding transformed parts, the parts' costs summed (``fracpass.parts.parts_cost``).
    """
    parts = parts_of(qmodel)
    if parts is not None:
        from fracpass.parts import parts_cost

        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        return parts_cost(qmodel, parts, inputs, dict(example_kwargs or {}), target, stage)
    from fracpass.passes.cost_analysis import CostAnalysisPass
    from fracpass.targets import load_target

    state = model_state(qmodel)
    example_inputs, example_kwargs = example_args(state, example_inputs, example_kwargs)
    if not example_inputs and not example_kwargs:
        raise FracpassError("cost: no example inputs; pass example_inputs=(x,) (the costs depend on input shapes)")
    loaded = load_target(target) if target is not None else None
    stage = current_stage(qmodel) if stage is None else stage
    hub = gate_hub(qmodel)
    run = lambda: CostAnalysisPass(example_inputs, example_kwargs or {}, state.plan.num_stages, stage, loaded)(qmodel)
    with _gc_paused():
        if hub is None:
            return run().result
        prior = hub.stats()
        with hub.keeping_choices():  # gate_stats / gate_loss stay about the user's last batch
            report = run().result
            example = hub.stats()  # the cost run sent the example inputs through the gates
    _cost_gates(qmodel, report, hub, prior or example, "last training batch" if prior else "example inputs")
    return report


def _cost_gates(qmodel, report, hub, stats, source: str) -> None:
    """Cost gated ops with the measured mix of options, and add the per-option table."""
    from fracpass.costreport import GateCost

    options = tuple(zip(hub.options_a.tolist(), hub.options_g.tolist()))
    units = {node.name: meta.gated(node) for node in qmodel.graph.nodes if meta.gated(node) is not None}
    report.ops = [dataclasses.replace(op, gated=units[op.op], mix=tuple(
        (share, a, g) for share, (a, g) in zip(stats.units[units[op.op]], options))) if op.op in units else op
        for op in report.ops]
    macs = hub.macs_per_sample()
    costs = hub.unit_costs.tolist()
    report.gates = GateCost(options, {u: tuple(costs[i]) for i, u in enumerate(hub.unit_names)}, dict(stats.units),
                            source, macs, float(3 * macs * FULL_PRECISION ** 2))
