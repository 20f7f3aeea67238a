"""Where torch.compile breaks a native model's graph: the few reads of a tensor value on the host that choose a
native call's path. Each such read is a function wrapped by ``eager``: Dynamo runs it eagerly between compiled
graphs (the rest of the call compiles), ``fullgraph=True`` fails naming it, and a plain compile warns once.
The wrappers need torch._dynamo, whose import takes about 2 s here, so ``install`` builds them when the
lower-native pass runs (every native model passes through it; unpickling transforms again), not at import."""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Dict, Tuple

import torch

COMPILE_BREAK = ("fracpass native call {name}: {why}, a read of a tensor value on the host that torch.compile cannot "
                 "trace, so that part runs eagerly between compiled graphs. Compile without fullgraph=True to run it "
                 "so, or transform with execution='simulate', which compiles as one graph (docs/compile.md)")

COMPILE_FALLBACK = ("fracpass: torch.compile breaks this model's graph at each gated native call (its check whether "
                    "every sample chose one option reads a value on the host) and each opt-in int8 conv2d call (its "
                    "check for a NaN in the input): those parts run eagerly between compiled graphs, with eager's "
                    "values. To compile as one graph, transform with execution='simulate' (docs/compile.md)")

_compile_warned = False  # COMPILE_FALLBACK is said once per process
_EAGER: Dict[str, Tuple[Callable, str]] = {}  # name -> (the function, why it reads the host)
_BREAKS: Dict[str, Callable] = {}  # name -> the function as Dynamo must see it (``install``)


def _warn_compiled(ctx) -> None:
    """Run by Dynamo while it traces a break (torch._dynamo.comptime): says COMPILE_FALLBACK once per process
    (Dynamo traces each segment between breaks apart, and a warning raised inside its tracer is not
    deduplicated by Python's filters)."""
    global _compile_warned
    if not _compile_warned:
        _compile_warned = True
        warnings.warn(COMPILE_FALLBACK, stacklevel=2)


def eager(fn: Callable, name: str, why: str) -> Callable:
    """``fn`` as torch.compile must run it: eagerly between compiled graphs (``why``: what it reads on the host).
    Outside a compile, ``fn`` itself runs."""
    _EAGER[name] = (fn, why)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return _BREAKS.get(name, fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def install() -> None:
    """Build what Dynamo runs at each ``eager`` function (see the module docstring)."""
    if _BREAKS:
        return
    from torch._dynamo.comptime import comptime

    def broken(fn, name, why):
        run = torch.compiler.disable(fn, recursive=True, reason=COMPILE_BREAK.format(name=name, why=why))

        def call(*args, **kwargs):
            comptime(_warn_compiled)  # while Dynamo traces, the warning
            return run(*args, **kwargs)

        return call

    _BREAKS.update({name: broken(fn, name, why) for name, (fn, why) in _EAGER.items()})
