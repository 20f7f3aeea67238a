"""Capture a model as a torch.fx.GraphModule: ``symbolic_trace``, else non-strict ``torch.export``.

Both paths capture the model in its current mode (train or eval): tracing bakes
``F.dropout(training=self.training)`` and export bakes every mode-dependent op, so the transformed
model captures once per mode, on demand (see ``fracpass.api.QuantizedGraphModule``).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional, Tuple, Type, Union

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from fracpass.errors import TraceError

__all__ = ["CaptureOptions", "capture"]

log = logging.getLogger("fracpass.capture")

_TORCH_DIR = os.path.dirname(torch.__file__)
METHODS = ("auto", "fx", "export")


@dataclass(frozen=True)
class CaptureOptions:
    method: str = "auto"  # "auto": fx, falling back to export; or force one
    leaf_modules: Tuple[Union[str, type], ...] = ()  # module types or paths fx must not trace into
    concrete_args: Optional[Dict[str, Any]] = None  # fx: arguments to specialise on
    dynamic_batch: bool = True  # export: mark dim 0 of every tensor input dynamic

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TraceError(f"capture={self.method!r} is not one of {METHODS}")
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaves: Iterable[Union[str, type]] = ()):
        super().__init__()
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.leaf_paths = frozenset(x for x in leaves if isinstance(x, str))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_paths:
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class Captured:
    graph_module: torch.fx.GraphModule
    method: str  # "fx" or "export"
    notes: Tuple[str, ...] = field(default=())


def capture(model: nn.Module, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None,
            options: CaptureOptions = CaptureOptions(),
            module_class: Type[torch.fx.GraphModule] = torch.fx.GraphModule) -> Captured:
    """Capture ``model`` (in its current mode) as a ``module_class``.

    Raises TraceError naming the module, the source line and the fix.
    """
    kwargs = dict(kwargs or {})
    fx_failure: Optional[str] = None
    if options.method in ("auto", "fx"):
        tracer = _Tracer(options.leaf_modules)
        try:
            with _no_concrete_branches():
                graph = tracer.trace(model, concrete_args=options.concrete_args)
            return Captured(module_class(tracer.root, graph, type(model).__name__), "fx")
        except Exception as e:  # fx raises many types; all of them mean "cannot trace"
            fx_failure = _describe_fx_failure(e, tracer)
            if options.method == "fx":
                raise TraceError(_message(model, fx_failure, None, have_examples=bool(args or kwargs), forced_fx=True)) from e
            log.info("symbolic_trace failed (%s); trying torch.export", fx_failure.splitlines()[0])
    if not (args or kwargs):
        raise TraceError(_message(model, fx_failure, None, have_examples=False))
    try:
        return _export(model, args, kwargs, options, module_class)
    except Exception as e:
        raise TraceError(_message(model, fx_failure, _describe_export_failure(e), have_examples=True)) from e


class FrozenControlFlow(RuntimeError):
    """A traced forward branched on a concrete tensor value: fx would freeze that branch."""


@contextlib.contextmanager
def _no_concrete_branches():
    """Fail fx tracing where forward turns a real tensor into a Python bool or number.

    Under symbolic_trace, a tensor made without proxy inputs (LayerDrop's ``torch.rand(()) < p``)
    is concrete, so ``if`` on it silently freezes one branch into the graph.
    """
    saved = {name: getattr(torch.Tensor, name) for name in ("__bool__", "item")}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise FrozenControlFlow(
                f"forward calls Tensor.{name}() on a tensor value while tracing, so fx would freeze that "
                "branch into the graph (random control flow such as LayerDrop's `torch.rand(()) < p`, or a "
                "branch on a buffer's value)")

        return method

    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _export(model: nn.Module, args, kwargs, options: CaptureOptions, module_class) -> Captured:
    args, kwargs, widened = _widen_batch(args, kwargs)
    notes = []
    dynamic = _batch_dims(model, args, kwargs) if options.dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic, strict=False)
        except Exception as e:
            if dynamic is None:
                raise
            log.warning("export with a dynamic batch dimension failed (%s); retrying with static shapes",
                        str(e).splitlines()[0][:200])
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
            notes.append("static shapes: the model only runs at the example batch size")
    if widened:
        notes.append("example batch of 1 widened to 2 so the batch dimension stays dynamic")
    exported = ep.module()
    # ep.module() refuses .train()/.eval(); a plain GraphModule over the same graph does not.
    gm = module_class(exported, exported.graph, type(model).__name__)
    return Captured(gm, "export", tuple(notes))


def _widen_batch(args, kwargs):
    """torch.export specialises size-1 dims; capture a batch of 1 as a batch of 2."""
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not leaves or any(x.shape[0] != 1 for x in leaves):
        return args, kwargs, False
    widen = lambda x: torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
    return pytree.tree_map(widen, args), pytree.tree_map(widen, kwargs), True


def _batch_dims(model: nn.Module, args, kwargs):
    """dynamic_shapes marking dim 0 of every tensor input, keyed by forward's parameter names."""
    mark = lambda x: {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    spec = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(pytree.tree_map(mark, v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: pytree.tree_map(mark, v) for k, v in value.items()}
        else:
            spec[name] = pytree.tree_map(mark, value)
    return spec


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame outside torch, i.e. the user's source line."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)
              and "/fracpass/" not in f.filename]
    return frames[-1] if frames else None


def _where(exc: BaseException) -> str:
    frame = _user_frame(exc)
    if frame is None:  # the failure is inside torch's own modules: name the innermost frame
        frames = traceback.extract_tb(exc.__traceback__)
        frame = frames[-1] if frames else None
    return f"{frame.filename}:{frame.lineno} ({frame.line})" if frame else "unknown source line"


def _describe_fx_failure(exc: BaseException, tracer: _Tracer) -> str:
    stack = list(getattr(tracer, "module_stack", {}).values())
    module = stack[-1][0] if stack and stack[-1][0] else "<root>"
    if module != "<root>" and len(stack) > 0:
        module = f"{module} ({stack[-1][1].__name__ if isinstance(stack[-1][1], type) else stack[-1][1]})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"torch.fx.symbolic_trace failed in module {module} at {_where(exc)}: {type(exc).__name__}: {first}"


def _describe_export_failure(exc: BaseException) -> str:
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    hints = []
    if "DynamicCache" in text or ("Cache" in text and "pytree" in text):
        hints.append("the model returns a KV cache object: build it with use_cache=False (config.use_cache = False)")
    if "data-dependent" in text or "DataDependent" in text:
        hints.append("control flow depends on tensor values — random control flow such as LayerDrop's "
                     "`torch.rand(()) < p` cannot be captured: disable it (e.g. layerdrop=0) or move it out of forward")
    msg = f"torch.export (non-strict) failed at {_where(exc)}: {type(exc).__name__}: {first}"
    return msg + "".join(f"\n    hint: {h}" for h in hints)


def _message(model: nn.Module, fx_failure: Optional[str], export_failure: Optional[str], have_examples: bool,
             forced_fx: bool = False) -> str:
    lines = [f"fracpass could not capture {type(model).__name__}:"]
    if fx_failure:
        lines.append(f"  - {fx_failure}")
    if export_failure:
        lines.append(f"  - {export_failure}")
    elif forced_fx:
        lines.append("  - torch.export was not tried because capture_method='fx'; "
                     "use capture_method='auto' (or 'export') to fall back to it")
    elif not have_examples:
        lines.append("  - torch.export was not tried: it needs example inputs "
                     "(pass example_inputs=(x,) or example_kwargs=dict(...) to fracpass.transform)")
    lines.append(
        "How to fix: mark the module that fails as a leaf (transform(..., leaf_modules=['path.to.module'] or "
        "[ModuleType])), pass concrete_args={...} for arguments that steer Python control flow, give example "
        "inputs so torch.export can be tried, or remove random control flow (LayerDrop) from forward."
    )
    return "\n".join(lines)
