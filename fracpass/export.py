"""ONNX export of a transformed model at a chosen stage, with quantizers as standard Q/DQ ops.

torch.onnx refuses fake-quant ranges other than 8-bit ones, so fracpass writes its own QDQ: each
quantizer is exported as a marker op (``fracpass::Quant``) and then expanded, with
onnx-graphsurgeon, into the form onnxruntime computes exactly for its bit width:

    activations, 2-8 bits:  QuantizeLinear(uint8) -> Clip(0, 2^b - 1) -> DequantizeLinear
    activations, 9-16 bits: QuantizeLinear(uint16) -> Cast(int32) -> Clip -> Cast(uint16) -> DequantizeLinear
    weights:                an integer initializer (uint4 up to 4 bits, uint8 up to 8, uint16 up to 16)
                            -> DequantizeLinear, per output channel
    gated activations:      ArgMax(gate one-hot) -> Gather(per-option scale, zero point, levels) ->
                            Div -> Round -> Max/Min(per-sample bounds) -> Mul, Where(skip: x)

A gated quantizer's scale and clip bounds differ per sample, picked by the gate subgraph (pool,
linears, LSTM cell, linear, ArgMax), which is exported with the model. QuantizeLinear takes one
scale per tensor or per axis element and Clip takes scalar bounds, so the gated form is written
in float arithmetic that computes the same ``clamp(round(x / s), -zp, levels - zp) * s`` (ONNX
Round is round-half-to-even, as torch.round).

The scale and zero point are the quantizer's (the EMA range for activations), so QuantizeLinear
computes ``round(x / s) + zp`` exactly as fracpass does. Gradient quantizers are training-only:
they are dropped and listed in the metadata. A Conv/Gemm bias is moved into a separate Add, so
onnxruntime's default optimisations do not round it onto the int32 grid.
"""
from __future__ import annotations

import inspect
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fracpass.errors import ExportError
from fracpass.gating import GatedActQuant, GatedGradQuant
from fracpass.quant import FULL_PRECISION, ActQuant, GradQuant, Quantizer, WeightQuant, affine_params

__all__ = ["export_onnx"]

log = logging.getLogger("fracpass.export")
MAX_BITS = 16


class _Marker(torch.autograd.Function):
    """Identity in PyTorch; a ``fracpass::Quant(x)`` node in the exported graph, or for a gated
    quantizer ``fracpass::GatedQuant(x, onehot)``."""

    @staticmethod
    def forward(ctx, x, name, role, *gate):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def symbolic(g, x, name, role, *gate):
        out = g.op("fracpass::GatedQuant" if gate else "fracpass::Quant", x, *gate, name_s=name, role_s=role)
        out.setType(x.type())
        return out


class _ExportQuant(nn.Module):
    def __init__(self, name: str, role: str):
        super().__init__()
        self.name, self.role = name, role

    def forward(self, x, *gate):
        return _Marker.apply(x, self.name, self.role, *gate)


class _Dropped(nn.Module):
    """Where a gradient quantizer was (training-only): passes its input through."""

    def forward(self, x, *gate):
        return x


def export_onnx(qmodel: nn.Module, path: Union[str, Path], example_inputs: Sequence[Any] = (),
                example_kwargs: Optional[Dict[str, Any]] = None, *, stage: int = -1, opset: int = 21,
                dynamic_batch: bool = True, check: bool = True, verify: bool = True):
    """Write the eval-mode graph of ``qmodel`` at ``stage`` as ONNX; returns the onnx.ModelProto.

    Activation quantizers use their EMA ranges, so run some training batches (or a calibration
    pass in train mode) first. Raises ExportError naming the node for anything that cannot be
    exported exactly. With ``verify`` (and onnxruntime installed) the model is run on the example
    inputs, and with ``dynamic_batch`` at one more sample too, and compared with PyTorch before
    anything is written: a model that runs differently is never written.
    """
    import onnx

    from fracpass import __version__
    from fracpass.api import example_args, current_stage, set_stage
    from fracpass.state import model_state, simulated_copy

    state = model_state(qmodel)
    _check_writable(path)  # before the export work, which takes seconds to minutes
    if opset < 21:
        raise ExportError(f"export_onnx: opset {opset} is too old; the quantizer forms need opset 21 "
                          "(uint4 and uint16 QuantizeLinear/DequantizeLinear)")
    example_inputs, example_kwargs = example_args(state, example_inputs, example_kwargs)
    n = state.plan.num_stages
    if not -n <= stage < n:
        raise ExportError(f"export_onnx: stage {stage} is out of range; the plan has {n} stage(s)")
    stage %= n
    was_stage, was_training = current_stage(qmodel), qmodel.training
    qmodel.eval()  # the eval graph: EMA ranges, no dropout, BatchNorm statistics
    try:
        set_stage(qmodel, stage)
        # a native model exports what its simulation computes (Q/DQ around float ops): its int8 and bf16
        # products round differently, within their bounds, so the reference is the simulated copy too
        work = simulated_copy(qmodel)
        references = []
        if verify:
            for batch_args, batch_kwargs in _verification_inputs(example_inputs, example_kwargs, dynamic_batch):
                references.append((batch_args, batch_kwargs, *_run_recording_choices(work, batch_args, batch_kwargs)))
    finally:
        set_stage(qmodel, was_stage)
        qmodel.train(was_training)
    quantizers, dropped = _swap_quantizers(work)
    if dynamic_batch:
        _trace_sizes(work)
    model = _torch_export(work, example_inputs, example_kwargs, opset, dynamic_batch)
    try:
        model = _expand_markers(model, quantizers)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"export_onnx: rewriting the quantizers into Q/DQ failed: {type(e).__name__}: {e}") from e
    for key, value in (("fracpass.version", __version__), ("fracpass.stage", str(stage)),
                       ("fracpass.plan", state.plan.to_toml()),
                       ("fracpass.dropped_gradient_quantizers", ",".join(dropped))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise ExportError(f"export_onnx: the exported model fails onnx.checker: {e}") from e
    data = model.SerializeToString()
    if verify:
        _verify(data, references, dynamic_batch)
    Path(path).write_bytes(data)
    log.info("exported %s at stage %d to %s (%d quantizers, %d gradient quantizers dropped)", type(qmodel).__name__,
             stage, path, len(quantizers), len(dropped))
    return model


def _check_writable(path: Union[str, Path]) -> None:
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise ExportError(f"export_onnx: cannot write {path}: it is a directory; give a file name, e.g. {path / 'model.onnx'}")
    if not folder.is_dir():
        raise ExportError(f"export_onnx: cannot write {path}: directory {folder} does not exist; create it first "
                          f"(Path({str(folder)!r}).mkdir(parents=True))")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ExportError(f"export_onnx: cannot write {path}: permission denied; choose a writable path")


def _first_tensor(output: Any) -> torch.Tensor:
    from torch.utils import _pytree as pytree

    if hasattr(output, "to_tuple"):  # transformers' ModelOutput
        output = output.to_tuple()
    return next(x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor))


def _verification_inputs(args, kwargs, dynamic_batch: bool):
    """The example inputs, and with a dynamic batch the same plus one more sample."""
    from torch.utils import _pytree as pytree

    cases = [(tuple(args), dict(kwargs))]
    if dynamic_batch:
        grow = lambda x: torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
        cases.append((pytree.tree_map(grow, tuple(args)), pytree.tree_map(grow, dict(kwargs))))
    return cases


def _run_recording_choices(qmodel: nn.Module, args, kwargs):
    """qmodel's first output tensor; per gated activation quantizer (by its ONNX stem) the option each
    sample's gate chose; and per plain activation quantizer, in the order they ran, its input and output
    (what the layer-by-layer judgement compares onnxruntime's Q/DQ with)."""
    choices, acts, hooks = {}, {}, []
    for name, q in qmodel.named_modules():
        stem = name.replace(".", "_")
        if isinstance(q, GatedActQuant):
            def record(module, inputs, output, stem=stem):
                choices[stem] = inputs[1].detach().argmax(1)
                acts.setdefault(stem, (inputs[0].detach(), output.detach(), choices[stem]))
            hooks.append(q.register_forward_hook(record))
        elif isinstance(q, ActQuant) and q.bits < FULL_PRECISION:
            def record_act(module, inputs, output, stem=stem):
                acts.setdefault(stem, (inputs[0].detach(), output.detach(), None))
            hooks.append(q.register_forward_hook(record_act))
    try:
        with torch.no_grad():
            return _first_tensor(qmodel(*args, **kwargs)), choices, acts
    finally:
        for h in hooks:
            h.remove()


def _verify(data: bytes, references, dynamic_batch: bool) -> None:
    """Run the exported bytes in onnxruntime and compare with PyTorch. A coarse check, mean |diff|
    <= 1e-2 of the output range: on a few example samples one value on a rounding boundary can
    land a step apart and propagate, while a wrong scale, zero point or baked shape is far off.

    With gates, a sample whose gate logits nearly tie can pick another option in onnxruntime (its
    float sums differ by an ulp), and at 3-4 bits that moves its output far. So the gates' choices
    are read from the exported graph too: samples where any gate chose differently are left out of
    the comparison (logged), and at least half the samples must agree on every choice.

    Every plain activation quantizer is also compared, layer by layer (``_judge_layers``): onnxruntime
    and PyTorch sum convolutions in other orders, so a code whose unrounded value sat on a rounding
    boundary can land one step apart and move a small output range by more than 1e-2. Such an export
    is correct and is written; one whose first differing layer differs otherwise (a wrong scale, which
    at 8 bits can leave the output within 1e-2 of its range) is refused, naming that layer."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        log.info("onnxruntime is not installed: the exported model was not verified")
        return
    stems = sorted({stem for _, _, _, choices, _ in references for stem in choices})
    if stems:  # expose each gated quantizer's ArgMax as an extra output of a verification copy
        model = onnx.load_from_string(data)
        model.graph.output.extend(onnx.helper.make_tensor_value_info(f"{stem}_choice", onnx.TensorProto.INT64, None)
                                  for stem in stems)
        data = model.SerializeToString()
    session = ort.InferenceSession(data)
    names = [i.name for i in session.get_inputs()]
    for i, (args, kwargs, expected, choices, acts) in enumerate(references):
        values = list(args) + list(kwargs.values())
        feeds = {n: v.numpy() for n, v in zip(names, [v for v in values if isinstance(v, torch.Tensor)])}
        try:
            got, *onnx_choices = session.run([session.get_outputs()[0].name] + [f"{s}_choice" for s in stems], feeds)
        except Exception as e:
            what = "at a batch size other than the example's" if i else "on the example inputs"
            hint = (": the traced graph fixed the batch size somewhere; export with dynamic_batch=False"
                    if i else "")
            raise ExportError(f"export_onnx: the exported model fails in onnxruntime {what}{hint} "
                              f"({str(e).splitlines()[0][:300]})") from e
        expected = expected.numpy()
        same = np.ones(expected.shape[0] if expected.ndim else 1, dtype=bool)
        if stems and got.shape == expected.shape:
            for stem, theirs in zip(stems, onnx_choices):
                ours = choices[stem].numpy()
                if theirs.shape == ours.shape == same.shape:
                    same &= theirs == ours
            if same.sum() * 2 < same.size:
                raise ExportError(f"export_onnx: the exported gates choose differently from PyTorch's on {(~same).sum()} "
                                  f"of {same.size} samples; nothing was written. {_ANYWAY}")
            if not same.all():
                log.info("export_onnx: verification leaves out %d of %d samples whose gate logits nearly tie "
                         "(onnxruntime picked another option)", (~same).sum(), same.size)
            got, expected = got[same], expected[same]
        scale = float(expected.max() - expected.min()) or 1.0
        mean_diff = float(np.abs(got - expected).mean()) if got.shape == expected.shape else float("nan")
        differs = (f"onnxruntime's output differs from PyTorch's (shape {got.shape} vs {expected.shape}, "
                   f"mean |diff| {mean_diff:.3g} vs range {scale:.3g})")
        if got.shape != expected.shape:
            raise ExportError(f"export_onnx: {differs}; nothing was written. {_ANYWAY}")
        verdict, layer = _judge_layers(data, feeds, acts, same)
        if layer == "differs":  # a wrong scale, zero point or op shows here even where the output stays close
            raise ExportError(f"export_onnx: onnxruntime's output differs from PyTorch's in its quantized activations: {verdict} "
                              f"(end to end: mean |diff| {mean_diff:.3g} vs range {scale:.3g}); nothing was written. "
                              f"{_ANYWAY}")
        if mean_diff <= 1e-2 * scale:
            continue
        if layer == "ties":
            log.info("export_onnx: %s, from rounding ties: %s; written", differs, verdict)
            continue
        raise ExportError(f"export_onnx: {differs}; {verdict}; nothing was written. {_ANYWAY}")


_TIE_BAND = 0.05  # of a step: how near a rounding boundary a flipped code may have sat to count as a tie
# a share of a layer's codes one step apart beyond which the export is wrong whatever its output; below it, one-step
# flips away from a boundary (seen at a model input's 4-bit codes while the output matched to 4e-9 of its range in
# the fuzz tests) are judged by the output
_FLIPS_LIMIT = 0.05
_ANYWAY = "If you have checked the model otherwise, write it anyway with export_onnx(..., verify=False)"


def _judge_layers(data: bytes, feeds, acts: Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
                  samples: np.ndarray) -> Tuple[str, str]:
    """Compare every activation quantizer's output in onnxruntime with PyTorch's, in execution order,
    up to the first that differs, on ``samples`` (those whose gates chose alike). ``acts`` holds per
    quantizer its input, its output and, for a gated one, each sample's option. Returns what was found
    and a verdict: "equal", "ties", "flips" (one-step flips that are not clearly ties: the output
    decides) or "differs" (codes several steps apart, or more than ``_FLIPS_LIMIT`` of a layer).

    Ties: each differing code is one step apart and its unrounded PyTorch value sat within float
    noise (or ``_TIE_BAND`` of a step) of a rounding boundary, in at most 1 % of the layer's elements or 4 of them (onnxruntime and PyTorch sum
    convolutions in other orders). A gated quantizer is judged per sample on its option's grid (a
    sample at a skip or full-precision option passes its input through and is not judged): a tie there
    grows through the low-precision layers after it, so judging only the plain quantizers would meet it
    downstream as codes several steps apart. A wrong scale, zero point, rounding mode or op shows at
    its first layer otherwise. Later layers are not judged: their inputs already differ."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(data)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dequant = {}  # stem -> the tensor its (gated) dequantize writes
    for node in model.graph.node:
        for suffix in ("/DequantizeLinear", "/GatedDequantize"):
            if node.name.endswith(suffix):
                dequant[node.name[:-len(suffix)]] = node.output[0]

    def grid(stem: str, choice: Optional[torch.Tensor]):
        """Per sample (or for the tensor) the scale and zero point of the codes; None if not comparable."""
        if choice is None:
            scale = inits.get(f"{stem}_scale")
            return None if scale is None or scale.size != 1 else (float(scale), float(inits[f"{stem}_zero_point"]))
        scales, active = inits.get(f"{stem}_scales"), inits.get(f"{stem}_actives")
        if scales is None or active is None:
            return None
        return scales[choice.numpy()].astype(np.float64), active[choice.numpy()]

    stems = [stem for stem in acts if stem in dequant and grid(stem, acts[stem][2]) is not None]
    if not stems:
        return "no activation quantizer to compare", "equal"
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_value_info(dequant[stem], onnx.TypeProto())
                              for stem in stems if dequant[stem] not in known)
    session = ort.InferenceSession(model.SerializeToString())
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for stem in stems:
        inp, ours, choice = acts[stem]
        inp, ours, theirs = inp.numpy(), ours.numpy(), outputs[dequant[stem]]
        if theirs.shape != ours.shape:
            return f"the first layer that differs is {stem} (shape {theirs.shape} vs {ours.shape})", "differs"
        keep = samples if ours.ndim and ours.shape[0] == samples.size else None
        if choice is None:
            scale, zero = grid(stem, None)
        else:  # per sample, broadcast over the rest; samples at a pass-through option are not judged
            scales, active = grid(stem, choice)
            keep = active.astype(bool) if keep is None else keep & active.astype(bool)
            scale, zero = scales.reshape((-1,) + (1,) * (ours.ndim - 1)), 0.0
        if keep is not None and not keep.all():
            inp, ours, theirs = inp[keep], ours[keep], theirs[keep]
            scale = scale[keep] if isinstance(scale, np.ndarray) else scale
        if ours.size == 0:
            continue
        steps = np.abs(theirs - ours) / scale
        off = steps > 1e-3
        if not off.any():
            continue
        code = (inp / scale + zero)[off]
        from_boundary = np.abs(np.abs(code - np.floor(code)) - 0.5)
        # float32 sums in another order differ by ~1e-6 of their inputs' magnitude
        noise = 1e-3 + 1e-6 * float(np.abs(inp).max() / np.min(scale))
        found = (f"the first layer that differs is {stem}: {off.mean():.2g} of its codes, by up to "
                 f"{steps.max():.3g} steps, up to {from_boundary.max():.2g} of a step from a rounding boundary")
        few = off.mean() <= 1e-2 or off.sum() <= 4  # a small layer (a classifier's input) may hold one tie in 20
        # near a boundary: within float noise for a layer after a convolution; a model input's codes at 2-3 bits
        # flipped 2e-3 of a step from one in the fuzz tests (a wrong scale, zero point or rounding mode flips far
        # more than 1 % of a layer, and by several steps)
        near = max(noise, _TIE_BAND)
        one_step = np.all(np.abs(steps[off] - 1) <= noise)
        if few and one_step and np.all(from_boundary <= near):
            return found, "ties"
        # a wrong scale, zero point or rounding mode moves codes by several steps, or a large share of a layer
        gross = not one_step or off.mean() > _FLIPS_LIMIT
        return found, "differs" if gross else "flips"
    return "every quantized activation agrees; the difference lies after the last quantizer", "equal"


def _swap_quantizers(work: nn.Module) -> Tuple[Dict[str, Quantizer], List[str]]:
    """Replace quantizer modules by markers (gradient ones by identity); keep the originals by name."""
    kept, dropped = {}, []
    for name, q in list(work.named_modules()):
        if not isinstance(q, Quantizer):
            continue
        if isinstance(q, (GradQuant, GatedGradQuant)):
            replacement = _Dropped()
            dropped.append(name)
        elif isinstance(q, GatedActQuant):
            options = q.options.tolist()
            if not bool(q.range_ready.any()):
                raise ExportError(f"export_onnx: gated activation quantizer {name!r} has no recorded range; run a few "
                                  "training batches (train mode) before exporting so its EMA ranges exist")
            if max(a for a in options if a < FULL_PRECISION) > MAX_BITS:
                raise ExportError(f"export_onnx: gated quantizer {name!r} has an option above {MAX_BITS} bits")
            kept[name] = q
            replacement = _ExportQuant(name, "act")
        elif q.bits >= FULL_PRECISION:
            replacement = nn.Identity()
        else:
            if q.bits > MAX_BITS:
                raise ExportError(f"export_onnx: quantizer {name!r} is at {q.bits} bits; ONNX Q/DQ forms that "
                                  f"onnxruntime runs exactly go up to {MAX_BITS} bits (use 16 or 32 in the plan)")
            if isinstance(q, ActQuant) and not q._range_ready:
                raise ExportError(f"export_onnx: activation quantizer {name!r} has no recorded range; run a few "
                                  "training batches (train mode) before exporting so its EMA range exists")
            kept[name] = q
            replacement = _ExportQuant(name, q.role)
        parent, _, leaf = name.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, leaf, replacement)
    return kept, dropped


def _trace_sizes(work: nn.Module) -> None:
    """Make a torch.export graph's sizes visible to the TorchScript tracer torch.onnx uses.

    A graph captured with torch.export reads the batch size with ``aten.sym_size.int(x, 0)`` and passes
    it to ``aten.reshape.default(y, [s, ...])``. Traced, the first returns a plain int and the second,
    an OpOverload call, takes every int as a constant: the batch size is baked into the ONNX graph.
    ``x.size(0)`` and the Tensor method (``y.reshape([s, ...])``) or torch function (``torch.arange(s)``)
    are what the tracer records as Shape -> Gather -> Reshape instead.
    """
    graph = getattr(work, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return
    sizes = set()
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.sym_size.int:
            with graph.inserting_before(node):
                size = graph.call_method("size", node.args)
            node.replace_all_uses_with(size)
            graph.erase_node(node)
            sizes.add(size)
        elif sizes and any(i in sizes for i in node.all_input_nodes):
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                name = node.target.overloadpacket.__name__
                receiver = node.args[0] if node.args else None
                if hasattr(torch.Tensor, name) and isinstance(receiver, torch.fx.Node) and receiver not in sizes:
                    node.op, node.target = "call_method", name  # y.reshape([s, ...])
                elif callable(getattr(torch, name, None)):
                    node.target = getattr(torch, name)  # torch.arange(s, dtype=...)
            if not isinstance(node.meta.get("val"), torch.Tensor):
                sizes.add(node)  # arithmetic on sizes (operator.mul) stays traced: its users are rewritten too
    if sizes:
        work.recompile()


class _TensorInputs(nn.Module):
    """``model`` called with the example inputs' non-tensor values (None, bools, ints) as Python constants.

    torch.onnx traces with TorchScript, which turns every input it is handed into a tensor, and fills
    in forward's defaults as inputs too: timm's ``forward(x, attn_mask=None, is_causal=False)`` then
    hands ``is_causal`` to ``scaled_dot_product_attention`` as a tensor, which it refuses (and a
    ``concrete_args`` guard ``is_causal == False`` hits an internal assert). Here only the tensors
    cross the traced boundary; everything else reaches the model as the value the example had.
    """

    def __init__(self, model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        super().__init__()
        self.model = model
        self.leaves, self.spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        self.slots = [i for i, v in enumerate(self.leaves) if isinstance(v, torch.Tensor)]

    def forward(self, *tensors):
        leaves = list(self.leaves)
        for i, t in zip(self.slots, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.model(*args, **kwargs)


def _needs_constant_inputs(work: nn.Module, args, kwargs) -> bool:
    """True if tracing ``work`` would turn a non-tensor value into an input: one in the example, or
    a default of forward's that the example does not set."""
    if any(not isinstance(v, torch.Tensor) for v in pytree.tree_leaves((tuple(args), dict(kwargs)))):
        return True
    sig = inspect.signature(work.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return False  # torch.onnx will say what does not fit
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return any(name not in bound.arguments for name, p in sig.parameters.items() if p.kind not in variadic)


def _torch_export(work: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], opset: int, dynamic_batch: bool):
    import onnx

    # positional inputs are input_0, input_1, ...; keyword inputs keep their names
    names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    if _needs_constant_inputs(work, args, kwargs):
        names = [f"input_{i}" for i, v in enumerate(args) if isinstance(v, torch.Tensor)] + \
            [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        work = _TensorInputs(work, args, kwargs)
        args, kwargs = tuple(work.leaves[i] for i in work.slots), {}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(work, args, buffer, kwargs=kwargs or None, dynamo=False, opset_version=opset,
                              custom_opsets={"fracpass": 1},
                              input_names=names, output_names=["output"], do_constant_folding=True,
                              dynamic_axes={n: {0: "batch"} for n in names + ["output"]} if dynamic_batch else None)
    except Exception as e:
        raise ExportError(f"export_onnx: torch.onnx could not export the model: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return onnx.load_from_string(buffer.getvalue())


def _integer_type(bits: int):
    import onnx

    if bits <= 4:
        return onnx.TensorProto.UINT4
    return onnx.TensorProto.UINT8 if bits <= 8 else onnx.TensorProto.UINT16


def _qparams(q: Quantizer, mn: torch.Tensor, mx: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, float]:
    levels = float(2**q.bits - 1)
    scale, lo, _ = affine_params(mn.float(), mx.float(), levels)
    return scale.numpy().astype(np.float32), (-lo).numpy().astype(np.int64), levels


def _expand_markers(model, quantizers: Dict[str, Quantizer]):
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    for node in [n for n in graph.nodes if n.op in ("Quant", "GatedQuant") and n.domain == "fracpass"]:
        name = node.attrs["name"]
        q = quantizers[name]
        src, out = node.inputs[0], node.outputs[0]
        onehot = node.inputs[1] if node.op == "GatedQuant" else None
        node.outputs.clear()
        node.inputs.clear()
        stem = name.replace(".", "_")
        if onehot is not None:
            _gated_act(graph, q, src, onehot, out, stem)
        elif isinstance(q, WeightQuant):
            _weight_qdq(graph, q, src, out, stem)
        else:
            _act_qdq(graph, q, src, out, stem)
    _bypass_identities(graph)
    _name_ops_like_fx(graph, quantizers)
    _split_bias(graph)
    graph.cleanup().toposort()
    uint4 = graph.__dict__.get("_fracpass_uint4", set())
    model = gs.export_onnx(graph)
    _repack_uint4(model, uint4)
    for op in [op for op in model.opset_import if op.domain == "fracpass"]:
        model.opset_import.remove(op)
    return model


def _act_qdq(graph, q: ActQuant, src, out, stem: str) -> None:
    import onnx_graphsurgeon as gs

    scale, zp, levels = _qparams(q, q.running_min, q.running_max)
    small = q.bits <= 8
    zp_dtype = np.uint8 if small else np.uint16
    s = gs.Constant(f"{stem}_scale", np.asarray(scale, dtype=np.float32).reshape(()))
    z = gs.Constant(f"{stem}_zero_point", np.asarray(zp, dtype=zp_dtype).reshape(()))
    quantized = gs.Variable(f"{stem}_q", dtype=zp_dtype)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{stem}/QuantizeLinear", inputs=[src, s, z], outputs=[quantized]))
    clipped = quantized
    if q.bits not in (8, 16):
        if small:
            clipped = gs.Variable(f"{stem}_clipped", dtype=zp_dtype)
            graph.nodes.append(gs.Node("Clip", f"{stem}/Clip", inputs=[
                quantized, gs.Constant(f"{stem}_qmin", np.asarray(0, np.uint8)),
                gs.Constant(f"{stem}_qmax", np.asarray(int(levels), np.uint8))], outputs=[clipped]))
        else:  # Clip on 16-bit integers is not implemented in onnxruntime's CPU provider: clip in int32
            wide = gs.Variable(f"{stem}_q32", dtype=np.int32)
            wide_clip = gs.Variable(f"{stem}_clipped32", dtype=np.int32)
            clipped = gs.Variable(f"{stem}_clipped", dtype=zp_dtype)
            graph.nodes += [
                gs.Node("Cast", f"{stem}/CastUp", attrs={"to": 6}, inputs=[quantized], outputs=[wide]),
                gs.Node("Clip", f"{stem}/Clip", inputs=[wide, gs.Constant(f"{stem}_qmin", np.asarray(0, np.int32)),
                                                        gs.Constant(f"{stem}_qmax", np.asarray(int(levels), np.int32))],
                        outputs=[wide_clip]),
                gs.Node("Cast", f"{stem}/CastDown", attrs={"to": 4}, inputs=[wide_clip], outputs=[clipped]),
            ]
    graph.nodes.append(gs.Node("DequantizeLinear", f"{stem}/DequantizeLinear", inputs=[clipped, s, z], outputs=[out]))


def _gated_act(graph, q: GatedActQuant, src, onehot, out, stem: str) -> None:
    """Per-sample fake quantization: the sample's option (ArgMax of the gate's one-hot) picks its scale and bounds."""
    import onnx_graphsurgeon as gs

    options = q.options.tolist()
    levels = [float(2**a - 1) if 0 < a < FULL_PRECISION else 0.0 for a in options]
    scales, lows, highs = [], [], []
    table_min, table_max = q.eval_ranges()
    for k, lv in enumerate(levels):
        if lv == 0:  # skip / not quantized: the row passes through (Where below); placeholders keep shapes
            scales.append(1.0), lows.append(0.0), highs.append(0.0)
            continue
        scale, lo, hi = affine_params(table_min[k].float(), table_max[k].float(), lv)
        scales.append(float(scale)), lows.append(float(lo)), highs.append(float(hi))
    v = lambda suffix, dtype=np.float32: gs.Variable(f"{stem}_{suffix}", dtype=dtype)
    choice = v("choice", np.int64)
    nodes = [gs.Node("ArgMax", f"{stem}/ArgMax", attrs={"axis": 1, "keepdims": 0}, inputs=[onehot], outputs=[choice])]
    if src.shape:  # rank known: (B,) -> (B, 1, ..., 1) by Unsqueeze
        axes = gs.Constant(f"{stem}_axes", np.arange(1, len(src.shape), dtype=np.int64))
        rank_nodes, per_sample = [], lambda key, flat, shaped: gs.Node(
            "Unsqueeze", f"{stem}/Unsqueeze_{key}", inputs=[flat, axes], outputs=[shaped])
    else:  # rank unknown (the exporter left no shape): reshape to [-1] + [1] * (rank - 1), read off Shape(src)
        rank_nodes, per_sample = _broadcast_shape(src, stem)
    nodes += rank_nodes
    picked = {}
    for key, values, dtype in (("scale", scales, np.float32), ("low", lows, np.float32), ("high", highs, np.float32),
                               ("active", [lv > 0 for lv in levels], np.bool_)):
        flat, shaped = v(f"{key}_row", dtype), v(f"{key}_b", dtype)
        nodes += [gs.Node("Gather", f"{stem}/Gather_{key}", attrs={"axis": 0},
                          inputs=[gs.Constant(f"{stem}_{key}s", np.asarray(values, dtype=dtype)), choice], outputs=[flat]),
                  per_sample(key, flat, shaped)]
        picked[key] = shaped
    div, rnd, lo, hi, deq = v("div"), v("round"), v("max"), v("min"), v("dq")
    nodes += [gs.Node("Div", f"{stem}/Div", inputs=[src, picked["scale"]], outputs=[div]),
              gs.Node("Round", f"{stem}/Round", inputs=[div], outputs=[rnd]),
              gs.Node("Max", f"{stem}/Max", inputs=[rnd, picked["low"]], outputs=[lo]),
              gs.Node("Min", f"{stem}/Min", inputs=[lo, picked["high"]], outputs=[hi]),
              gs.Node("Mul", f"{stem}/Mul", inputs=[hi, picked["scale"]], outputs=[deq]),
              gs.Node("Where", f"{stem}/GatedDequantize", inputs=[picked["active"], deq, src], outputs=[out])]
    graph.nodes += nodes


def _broadcast_shape(src, stem: str):
    """Nodes computing [-1, 1, ..., 1] of src's rank, and a maker of the Reshape that gives a per-sample
    vector that shape. A gated activation of any rank ((B, C), (B, T, C), (B, C, H, W)) takes this form when
    the exporter recorded no static shape for it."""
    import onnx_graphsurgeon as gs

    shape, tail, zeros, ones, target = (gs.Variable(f"{stem}_{n}", dtype=np.int64)
                                        for n in ("shape", "tail", "tail0", "ones", "bshape"))
    nodes = [gs.Node("Shape", f"{stem}/Shape", inputs=[src], outputs=[shape]),
             gs.Node("Slice", f"{stem}/SliceTail", inputs=[shape, gs.Constant(f"{stem}_one", np.asarray([1], np.int64)),
                                                          gs.Constant(f"{stem}_end", np.asarray([2**62], np.int64))],
                     outputs=[tail]),
             gs.Node("Mul", f"{stem}/Zeros", inputs=[tail, gs.Constant(f"{stem}_zero", np.asarray(0, np.int64))],
                     outputs=[zeros]),
             gs.Node("Add", f"{stem}/Ones", inputs=[zeros, gs.Constant(f"{stem}_unit", np.asarray(1, np.int64))],
                     outputs=[ones]),
             gs.Node("Concat", f"{stem}/BroadcastShape", attrs={"axis": 0},
                     inputs=[gs.Constant(f"{stem}_batch", np.asarray([-1], np.int64)), ones], outputs=[target])]
    reshape = lambda key, flat, shaped: gs.Node("Reshape", f"{stem}/Reshape_{key}", inputs=[flat, target],
                                                outputs=[shaped])
    return nodes, reshape


def _weight_qdq(graph, q: WeightQuant, src, out, stem: str) -> None:
    import onnx
    import onnx_graphsurgeon as gs

    if not isinstance(src, gs.Constant):
        raise ExportError(f"export_onnx: weight quantizer {stem!r} does not read a parameter in the exported graph "
                          f"(its input is computed: {src.name!r}); exclude the op or keep its weights at 32 bits")
    w = torch.from_numpy(np.array(src.values)).float()
    axis = None if q.axis is None else q.axis % w.dim()
    if axis is None:
        mn, mx = torch.aminmax(w)
    else:
        mn, mx = torch.aminmax(w.movedim(axis, 0).reshape(w.shape[axis], -1), dim=1)
    scale, zp, levels = _qparams(q, mn, mx)
    shape = [1] * w.dim()
    if axis is not None:
        shape[axis] = -1
    s_b, z_b = torch.from_numpy(scale).view(shape), torch.from_numpy(zp).view(shape).float()
    ints = (torch.round(w / s_b) + z_b).clamp_(0, levels).to(torch.int64).numpy()
    dtype = _integer_type(q.bits)
    holder = np.uint16 if q.bits > 8 else np.uint8  # uint4 is repacked after export (_repack_uint4)
    per_channel = axis is not None and scale.size > 1
    attrs = {"axis": axis} if per_channel else {}
    zp_values = zp.astype(holder).reshape(-1) if per_channel else zp.astype(holder).reshape(())
    weight = gs.Constant(f"{stem}_int", ints.astype(holder))
    z = gs.Constant(f"{stem}_zero_point", zp_values)
    if dtype == onnx.TensorProto.UINT4:
        graph.__dict__.setdefault("_fracpass_uint4", set()).update({weight.name, z.name})
    s = gs.Constant(f"{stem}_scale", scale.astype(np.float32).reshape(-1) if per_channel else
                    scale.astype(np.float32).reshape(()))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{stem}/DequantizeLinear", attrs=attrs, inputs=[weight, s, z],
                               outputs=[out]))
    if w.dim() == 2:
        _matmul_as_einsum(out)


def _matmul_as_einsum(weight) -> None:
    """Turn ``MatMul(x, W)`` and ``MatMul(x, Transpose(W))`` (a linear on a 3-D input) on a
    dequantized weight into an Einsum of the same product.

    onnxruntime fuses DequantizeLinear -> MatMul(B) into MatMulNBits, seeing through a Transpose in
    between, and by default (accuracy_level 4) that kernel rounds the activations to int8 inside: up
    to 1e-2 of the output range off PyTorch. An Einsum keeps the Q/DQ form and is computed in float32.
    """
    for user in list(weight.outputs):
        if user.op == "MatMul" and len(user.inputs) > 1 and user.inputs[1] is weight:
            user.op, user.attrs = "Einsum", {"equation": "...k,kn->...n"}
        elif user.op == "Transpose" and list(user.attrs.get("perm", [1, 0])) == [1, 0]:
            for matmul in list(user.outputs[0].outputs):
                if matmul.op == "MatMul" and len(matmul.inputs) > 1 and matmul.inputs[1] is user.outputs[0]:
                    matmul.op, matmul.attrs = "Einsum", {"equation": "...k,nk->...n"}
                    matmul.inputs[1] = weight


def _bypass_identities(graph) -> None:
    """Drop the Identity nodes left where gradient quantizers (training-only) were."""
    outputs = set(id(t) for t in graph.outputs)
    for node in [n for n in graph.nodes if n.op == "Identity"]:
        src, dst = node.inputs[0], node.outputs[0]
        if id(dst) in outputs:
            continue
        for consumer in list(dst.outputs):
            for i, tensor in enumerate(list(consumer.inputs)):
                if tensor is dst:
                    consumer.inputs[i] = src
        node.outputs.clear()


def _name_ops_like_fx(graph, quantizers: Dict[str, Quantizer]) -> None:
    """Give each compute node the name of the fx node it came from (the one its quantizers serve)."""
    taken = {n.name for n in graph.nodes}
    for name, q in quantizers.items():
        stem = name.replace(".", "_")
        dq = next((n for n in graph.nodes if n.name in (f"{stem}/DequantizeLinear", f"{stem}/GatedDequantize")), None)
        source = name.rsplit("_wq" if isinstance(q, WeightQuant) else "_aq", 1)[0]
        if dq is None or source in taken:
            continue
        consumers = [c for c in dq.outputs[0].outputs if c.op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")]
        if not consumers:  # a weight may pass through a Transpose before its MatMul
            consumers = [c2 for c in dq.outputs[0].outputs if c.op == "Transpose" for c2 in c.outputs[0].outputs
                         if c2.op in ("MatMul", "Gemm")]
        if len(consumers) == 1:
            consumers[0].name = source
            taken.add(source)


def _repack_uint4(model, names) -> None:
    """graph-surgeon cannot write 4-bit tensors: store the ones held as uint8 as UINT4."""
    import onnx
    from onnx import numpy_helper

    for i, init in enumerate(model.graph.initializer):
        if init.name in names:
            values = numpy_helper.to_array(init)
            model.graph.initializer[i].CopyFrom(onnx.helper.make_tensor(
                init.name, onnx.TensorProto.UINT4, list(values.shape), values.flatten().tolist()))


def _split_bias(graph) -> None:
    """Conv/ConvTranspose/Gemm(x, DQ(w), b) -> Add(Conv/ConvTranspose/Gemm(x, DQ(w)), b): onnxruntime otherwise
    rounds b onto the int32 grid of s_x * s_w when the result feeds a QuantizeLinear (its
    WeightBiasQuantization; seen for a grouped ConvTranspose feeding a quantized conv)."""
    import onnx_graphsurgeon as gs

    for node in list(graph.nodes):
        if node.op not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
            continue
        weight_from = node.inputs[1].inputs[0].op if node.inputs[1].inputs else None
        if weight_from != "DequantizeLinear":
            continue
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0
                                  or node.attrs.get("beta", 1.0) != 1.0):
            continue
        bias = node.inputs[2]
        node.inputs.pop()
        if node.op in ("Conv", "ConvTranspose") and isinstance(bias, gs.Constant):
            rank = len(node.inputs[1].shape) if node.inputs[1].shape else 4
            bias = gs.Constant(f"{bias.name}_b", np.asarray(bias.values).reshape([1, -1] + [1] * (rank - 2)))
        product = gs.Variable(f"{node.name}_nobias", dtype=np.float32)
        final = node.outputs[0]
        node.outputs = [product]
        graph.nodes.append(gs.Node("Add", f"{node.name}/BiasAdd", inputs=[product, bias], outputs=[final]))
