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

This file is the torch side (the markers, the trace, the metadata); the marker expansion is
``export_qdq.py``, the check against PyTorch in onnxruntime ``export_verify.py``.
"""
from __future__ import annotations

import inspect
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fracpass.errors import ExportError
from fracpass.gating import GatedActQuant, GatedGradQuant
from fracpass.export_qdq import expand_markers
from fracpass.export_verify import run_recording, verification_inputs, verify_onnx
from fracpass.quant import FULL_PRECISION, ActQuant, GradQuant, Quantizer

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
            for batch_args, batch_kwargs in verification_inputs(example_inputs, example_kwargs, dynamic_batch):
                references.append((batch_args, batch_kwargs, *run_recording(work, batch_args, batch_kwargs)))
    finally:
        set_stage(qmodel, was_stage)
        qmodel.train(was_training)
    quantizers, dropped = _swap_quantizers(work)
    if dynamic_batch:
        _trace_sizes(work)
    model = _torch_export(work, example_inputs, example_kwargs, opset, dynamic_batch)
    try:
        model = expand_markers(model, quantizers)
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
        verify_onnx(data, references, dynamic_batch)
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
