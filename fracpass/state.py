"""What a transformed model keeps about itself (ModelState), below every module that reads it.

``fracpass.transform`` stores a ModelState on the model it returns (``qmodel.fracpass``); the entry points,
the scheduler, checkpoints, export, check and the native reports read it through ``model_state``.
It lives here, not in api.py, so that none of them needs to import api for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch.fx
from torch import nn

from fracpass.capture import CaptureOptions
from fracpass.errors import FracpassError
from fracpass.native.options import NativeOptions
from fracpass.plan import Plan


@dataclass
class ModelState:
    """What a transformed model keeps to re-capture itself in the other train/eval mode."""

    plan: Plan
    options: CaptureOptions
    method: str  # the capture path that worked: "fx" or "export"
    root: nn.Module  # fracpass's private copy of the user's model: the template for re-capture
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    graphs: Dict[bool, torch.fx.Graph] = field(default_factory=dict)  # training flag -> graph
    graph_mode: bool = True
    stats: Dict[bool, Dict[str, Any]] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()
    stage: int = 0
    execution: str = "simulate"  # "native": the pipeline ends with lower-native (fracpass.native)
    native: NativeOptions = field(default_factory=NativeOptions)  # how lower-native lowers (execution="native")


def is_transformed(model: Any) -> bool:
    """Whether ``model`` is a model returned by fracpass.transform (it holds a ModelState)."""
    return isinstance(getattr(model, "fracpass", None), ModelState)


def model_state(qmodel: nn.Module) -> ModelState:
    """The ModelState of a model returned by fracpass.transform; a clear error for any other model."""
    state = getattr(qmodel, "fracpass", None)
    if not isinstance(state, ModelState):
        raise FracpassError(f"{type(qmodel).__name__} is not a model returned by fracpass.transform(); "
                            "transform it first: qmodel = fracpass.transform(model, plan, example_inputs=(x,))")
    return state


def simulated_copy(qmodel: nn.Module) -> nn.Module:
    """A deep copy of ``qmodel`` that runs as ``execution="simulate"``: for a native model, its graph captured
    again without the native lowering (its quantizers, their state and the stage kept), so every op computes
    what the simulation computes, which is what an ONNX export of it computes. Any other model: a deep copy."""
    import copy

    twin = copy.deepcopy(qmodel)
    state = model_state(twin)
    if state.execution == "native":
        state.execution = "simulate"
        state.graphs.clear()
        twin._use_mode(state, twin.training, recapture=True)
    return twin


def reconfigure_native(qmodel: nn.Module, options: NativeOptions) -> nn.Module:
    """fracpass.native.configure: new NativeOptions for a native model, its graphs lowered again."""
    state = model_state(qmodel)
    if not isinstance(options, NativeOptions):
        raise FracpassError(f"configure: options={options!r} is not a fracpass.NativeOptions")
    if state.execution != "native":
        raise FracpassError("configure: this model was transformed with execution='simulate'; NativeOptions apply to "
                            "execution='native' (transform the original model again with execution='native')")
    old, state.native = state.native, options
    if (old.kinds, old.fuse_bn) == (options.kinds, options.fuse_bn):
        # the same graph: the calls read their options from their sites at every call
        from fracpass.native.site import NativeSite

        for module in qmodel.modules():
            if isinstance(module, NativeSite):
                module.options = options
        return qmodel
    state.graphs.clear()  # other kinds or fusion: each mode is captured and lowered again on its next use
    qmodel._use_mode(state, qmodel.training, recapture=True)
    return qmodel
