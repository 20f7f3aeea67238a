"""Process-wide state that capture touches, kept to the thread that captures.

torch.fx patches ``nn.Module.__call__``/``__getattr__`` on the class and keeps its patcher in a
module global; non-strict torch.export keeps its mode stack and flags in module globals. Neither
survives two threads capturing at once ("CURRENT_PATCHER is None", "Trying to pop empty mode
stack"), so fracpass captures one model at a time (``CAPTURE_LOCK``).

What fracpass itself patches while it captures acts only on the capturing thread, is installed
once however many threads hold it, and is restored exactly when the last one leaves:

- ``Tensor.__bool__`` and ``Tensor.item`` refuse a concrete tensor value while fx traces
  (``no_concrete_branches``), so a branch on one is not frozen into the graph;
- torch's own diagnostics (log records, and the partial graph torch.export prints to stderr on a
  failure) are sent to fracpass's debug log (``quiet_torch``): the TraceError says what failed.
"""
from __future__ import annotations

import builtins
import contextlib
import logging
import threading
from typing import Callable, Iterator

import torch

__all__ = ["CAPTURE_LOCK", "FrozenControlFlow", "no_concrete_branches", "quiet_torch"]

log = logging.getLogger("fracpass.capture")

CAPTURE_LOCK = threading.RLock()  # reentrant: a capture may switch a model's mode, which captures again
_local = threading.local()  # flags of the capturing thread: refuse_concrete, quiet
_ABSENT = object()


class FrozenControlFlow(RuntimeError):
    """A traced forward branched on a concrete tensor value: fx would freeze that branch."""


class _SharedPatch:
    """A patch installed by the first holder and undone by the last, whatever the threads."""

    def __init__(self, install: Callable[[], Callable[[], None]]):
        self._install = install  # applies the patch, returns its undo
        self._lock = threading.Lock()
        self._holders = 0
        self._undo: Callable[[], None] = lambda: None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._undo = self._install()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._undo()


@contextlib.contextmanager
def _thread_flag(name: str) -> Iterator[None]:
    before = getattr(_local, name, False)
    setattr(_local, name, True)
    try:
        yield
    finally:
        setattr(_local, name, before)


def _refusing(name: str, original: Callable) -> Callable:
    def method(self, *args, **kwargs):
        if getattr(_local, "refuse_concrete", False):
            raise FrozenControlFlow(
                f"forward calls Tensor.{name}() on a tensor value while tracing, so fx would freeze that "
                "branch into the graph (random control flow such as LayerDrop's `torch.rand(()) < p`, or a "
                "branch on a buffer's value)")
        return original(self, *args, **kwargs)

    method.__name__ = name
    return method


def _install_concrete_guard() -> Callable[[], None]:
    own = {name: torch.Tensor.__dict__.get(name, _ABSENT) for name in ("__bool__", "item")}
    for name in own:
        setattr(torch.Tensor, name, _refusing(name, getattr(torch.Tensor, name)))

    def undo() -> None:
        for name, entry in own.items():  # inherited from TensorBase before: inherited again
            if entry is _ABSENT:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, entry)

    return undo


class _ToDebugLog(logging.Filter):
    """Turns a torch log record made on a quiet thread into a fracpass debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_local, "quiet", False):
            return True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("torch (%s): %s", record.name, record.getMessage())
        return False


_TO_DEBUG = _ToDebugLog()


def _quiet_print(*args, **kwargs) -> None:
    if getattr(_local, "quiet", False):
        log.debug("torch printed: %s", " ".join(map(str, args)))
        return
    builtins.print(*args, **kwargs)


def _install_quiet() -> Callable[[], None]:
    # A logger's own filters see the records made on it, wherever they propagate or are handled.
    loggers = [logging.getLogger("torch")] + [
        logger for name, logger in list(logging.Logger.manager.loggerDict.items())
        if name.startswith("torch.") and isinstance(logger, logging.Logger)]
    for logger in loggers:
        logger.addFilter(_TO_DEBUG)
    # torch.export prints the partial graph of a failed export with print(..., file=sys.stderr);
    # a module global named print shadows the builtin for that module only.
    import torch.export._trace as export_trace

    own_print = export_trace.__dict__.get("print", _ABSENT)
    export_trace.print = _quiet_print

    def undo() -> None:
        for logger in loggers:
            logger.removeFilter(_TO_DEBUG)
        if own_print is _ABSENT:
            del export_trace.print
        else:
            export_trace.print = own_print

    return undo


_CONCRETE_GUARD = _SharedPatch(_install_concrete_guard)
_QUIET = _SharedPatch(_install_quiet)


@contextlib.contextmanager
def no_concrete_branches() -> Iterator[None]:
    """Make ``Tensor.__bool__``/``.item`` raise FrozenControlFlow on this thread; other threads are untouched.

    Under symbolic_trace, a tensor made without proxy inputs (LayerDrop's ``torch.rand(()) < p``)
    is concrete, so ``if`` on it silently freezes one branch into the graph.
    """
    with _CONCRETE_GUARD.held(), _thread_flag("refuse_concrete"):
        yield


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Send what torch logs or prints to stderr on this thread to fracpass's debug log."""
    with _QUIET.held(), _thread_flag("quiet"):
        yield

