"""Capture a model as a torch.fx.GraphModule: ``symbolic_trace``, else non-strict ``torch.export``.

Both paths capture the model in its current mode (train or eval): tracing bakes
``F.dropout(training=self.training)`` and export bakes every mode-dependent op, so the transformed
model captures once per mode, on demand (see ``fracpass.api.QuantizedGraphModule``).
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from fracpass.capture_guard import CAPTURE_LOCK, no_concrete_branches, quiet_torch
from fracpass.errors import TraceError
from fracpass.traced import traced_forward

__all__ = ["CaptureOptions", "capture"]

log = logging.getLogger("fracpass.capture")

_PACKAGES = ("fracpass", "fracpass.passes", "fracpass.targets")  # the directories pyproject.toml installs
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
    """fx's Tracer with leaf modules, recording only the thread that traces.

    While fx traces, ``nn.Module.__call__`` and ``__getattr__`` are patched for every thread; a
    module another thread calls meanwhile runs as usual instead of entering this graph.
    """

    def __init__(self, leaves: Iterable[Union[str, type]] = ()):
        super().__init__()
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.leaf_paths = frozenset(x for x in leaves if isinstance(x, str))
        self.thread: Optional[int] = None
        self.tracing_into: List[nn.Module] = []  # torch.nn modules traced with a fracpass.traced forward

    def trace(self, root, concrete_args=None):
        self.thread = threading.get_ident()
        return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        inner = None if self._user_leaf(m, self.path_of_module(m)) else traced_forward(m, args, kwargs)
        if inner is None:
            return super().call_module(m, forward, args, kwargs)
        self.tracing_into.append(m)
        try:
            return super().call_module(m, inner, args, kwargs)
        finally:
            self.tracing_into.pop()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]):
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._user_leaf(m, qualname):
            return True
        if self.tracing_into and m is self.tracing_into[-1]:
            return False
        return super().is_leaf_module(m, qualname)

    def _user_leaf(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or qualname in self.leaf_paths


@dataclass
class Captured:
    graph_module: torch.fx.GraphModule
    method: str  # "fx" or "export"
    notes: Tuple[str, ...] = field(default=())


def capture(model: nn.Module, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None,
            options: CaptureOptions = CaptureOptions(),
            module_class: Type[torch.fx.GraphModule] = torch.fx.GraphModule) -> Captured:
    """Capture ``model`` (in its current mode) as a ``module_class``; one capture at a time per process.

    Raises TraceError naming the module, the source line and the fix.
    """
    check_examples(model, args, kwargs, options.concrete_args)
    with CAPTURE_LOCK, quiet_torch():
        return _capture(model, args, dict(kwargs or {}), options, module_class)


def check_examples(model: nn.Module, args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]],
                   concrete_args: Optional[Dict[str, Any]] = None) -> None:
    """Raise TraceError when the example inputs do not fit ``model.forward``'s parameters.

    Checked before capture: a keyword forward does not take would otherwise surface much later (in
    ``cost``, or as an export failure about something else). Parameters in ``concrete_args`` count
    as given. Nothing is checked without example inputs (fx then traces from the signature alone).
    """
    kwargs = kwargs or {}
    if not (args or kwargs):
        return
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C++ forward: let capture judge
        return
    params = sig.parameters
    kinds = [p.kind for p in params.values()]
    shown = f"{type(model).__name__}.forward{_plain(sig)}"
    accepted = ", ".join(name for name, p in params.items()
                         if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        unknown = [k for k in kwargs if k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY]
        if unknown:
            raise TraceError(f"example_kwargs: {shown} has no parameter {unknown[0]!r} "
                             f"(it accepts: {accepted or 'no keyword arguments'}); rename the keyword to one of "
                             "these or pass the value in example_inputs")
    positional = [name for name, p in params.items()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if inspect.Parameter.VAR_POSITIONAL not in kinds and len(args) > len(positional):
        raise TraceError(f"example_inputs: {len(args)} given, but {shown} takes at most {len(positional)} positional "
                         "(pass the others by name in example_kwargs, or drop the extra ones)")
    twice = [name for name in positional[:len(args)] if name in kwargs]
    if twice:
        raise TraceError(f"example inputs give {twice[0]!r} twice, as example_inputs[{positional.index(twice[0])}] "
                         f"and in example_kwargs, for {shown}; give it once")
    given = set(positional[:len(args)]) | set(kwargs) | set(concrete_args or {})
    missing = [name for name, p in params.items() if p.default is inspect.Parameter.empty and name not in given
               and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if missing:
        raise TraceError(f"example inputs give no value for {missing[0]!r} of {shown}; add it to example_inputs "
                         f"or example_kwargs=dict({missing[0]}=...)")


def _plain(sig: inspect.Signature) -> str:
    """``sig`` without annotations: ``(tokens, mask=None)``."""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _capture(model: nn.Module, args, kwargs, options: CaptureOptions, module_class) -> Captured:
    fx_failure: Optional[str] = None
    notes: Tuple[str, ...] = ()
    if options.method in ("auto", "fx"):
        tracer = _Tracer(options.leaf_modules)
        before = _TensorState.of(model)
        try:
            with no_concrete_branches():
                graph = tracer.trace(model, concrete_args=options.concrete_args)
        except Exception as e:  # fx raises many types; all of them mean "cannot trace"
            before.restore()  # what forward changed before it failed must not reach export
            fx_failure = _describe_fx_failure(e, tracer)
            if options.method == "fx":
                raise TraceError(_message(model, fx_failure, None, have_examples=bool(args or kwargs),
                                          forced_fx=True)) from e
            log.info("symbolic_trace failed (%s); trying torch.export", fx_failure.splitlines()[0])
            notes = (f"torch.fx could not trace {type(model).__name__}, so it was captured with torch.export "
                     f"({fx_failure.splitlines()[0]})",)
        else:
            updated = before.changed()
            if not updated:
                return Captured(module_class(tracer.root, graph, type(model).__name__), "fx")
            before.restore()  # the trace ran forward's update once; undo it
            fx_failure = (f"torch.fx.symbolic_trace would lose state updates: forward updates {_names(updated)} in "
                          "place, which fx runs once while tracing and leaves out of the graph")
            if options.method == "fx":
                raise TraceError(_message(model, fx_failure, None, have_examples=bool(args or kwargs),
                                          forced_fx=True))
            notes = (f"captured with torch.export: forward updates {_names(updated)} in place, which torch.fx "
                     "would run once while tracing and leave out of the graph",)
            log.info("forward updates %s in place; capturing with torch.export", _names(updated))
    if not (args or kwargs):
        raise TraceError(_message(model, fx_failure, None, have_examples=False))
    try:
        captured = _export(model, args, kwargs, options, module_class)
    except Exception as e:
        raise TraceError(_message(model, fx_failure, _describe_export_failure(e), have_examples=True)) from e
    captured.notes = notes + captured.notes
    return captured


class _TensorState:
    """Every buffer and tensor attribute of a model, to see (and undo) what a traced forward changed.

    Buffers are not proxied by fx: ``self.ema.mul_(0.9)`` or ``self.count += 1`` runs on the real
    tensor while tracing, once, and the graph never repeats it.
    """

    def __init__(self, entries: List[Tuple[str, nn.Module, str, torch.Tensor, Optional[int], torch.Tensor]]):
        self.entries = entries  # (qualified name, owner, attribute, tensor, version, saved values)

    @classmethod
    def of(cls, model: nn.Module) -> "_TensorState":
        entries = []
        for path, module in model.named_modules():
            for name, value in _tensor_attributes(module):
                entries.append((f"{path}.{name}" if path else name, module, name, value, _version(value),
                                value.detach().clone()))
        return cls(entries)

    def changed(self) -> List[str]:
        """Qualified names of the tensors that were replaced or updated in place."""
        return [qualname for qualname, module, name, value, version, _ in self.entries
                if _attribute(module, name) is not value or _version(value) != version]

    def restore(self) -> None:
        for _, module, name, value, version, saved in self.entries:
            if _attribute(module, name) is not value:
                (module._buffers if name in module._buffers else module.__dict__)[name] = value
            if _version(value) != version:
                with torch.no_grad():
                    value.copy_(saved)


def _tensor_attributes(module: nn.Module) -> Iterable[Tuple[str, torch.Tensor]]:
    yield from ((name, t) for name, t in module._buffers.items() if t is not None)
    yield from ((name, v) for name, v in vars(module).items()
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter))


def _attribute(module: nn.Module, name: str) -> Any:
    return module._buffers[name] if name in module._buffers else module.__dict__.get(name)


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _names(qualnames: List[str]) -> str:
    shown = ", ".join(qualnames[:5]) + (f" and {len(qualnames) - 5} more" if len(qualnames) > 5 else "")
    return f"{'buffer' if len(qualnames) == 1 else 'buffers'} {shown}"


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
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
            # said only once the retry worked: when it fails too, the TraceError says what failed
            log.warning("export with a dynamic batch dimension failed (%s); captured with static shapes",
                        str(e).splitlines()[0][:200])
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
    """The innermost traceback frame outside torch and fracpass, i.e. the user's source line."""
    own = _own_dirs()
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not os.path.realpath(f.filename).startswith(own)]
    return frames[-1] if frames else None


def _own_dirs() -> Tuple[str, ...]:
    """The directories of torch and of fracpass's packages, each ending in a separator.

    Matched by installed path, not by name: a user's checkout is often a folder named fracpass.
    """
    packages = [torch] + [importlib.import_module(name) for name in _PACKAGES]
    return tuple(os.path.join(os.path.realpath(d), "") for p in packages for d in p.__path__)


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
