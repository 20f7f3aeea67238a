"""Shared by the per-pass tests: capture a model, run default_pipeline's passes that come before the pass
under test, then hand that pass over, so each test file exercises one pass on a graph the real pipeline built."""
from __future__ import annotations

import copy
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fracpass import meta
from fracpass.capture import CaptureOptions, capture
from fracpass.native.options import NativeOptions
from fracpass.pass_base import PassBase, PassManager
from fracpass.pipeline import default_pipeline
from fracpass.plan import Gates, Plan, Stage

# every int8 and bf16 unit claimed (tests/native/test_found_by_users.py): the native paths run, emulated here
UNITS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_int8", "amx_bf16"})


def captured(model: torch.nn.Module, inputs: Sequence[Any], leaf_modules: Sequence[type] = ()) -> torch.fx.GraphModule:
    """An fx capture of a deep copy of ``model`` (the tests compare against the original)."""
    options = CaptureOptions(method="fx", leaf_modules=tuple(leaf_modules))
    return capture(copy.deepcopy(model), tuple(inputs), options=options).graph_module


def split(plan: Plan, pass_type: type, inputs: Sequence[Any] = (), native: Optional[NativeOptions] = None
          ) -> Tuple[List[PassBase], PassBase]:
    """default_pipeline's passes before the first ``pass_type``, and that pass (as the pipeline configures it)."""
    passes = default_pipeline(plan, tuple(inputs), native=native).passes
    for i, p in enumerate(passes):
        if isinstance(p, pass_type):
            return passes[:i], p
    raise LookupError(f"{pass_type.__name__} is not in default_pipeline for this plan")


def prepared(model: torch.nn.Module, plan: Plan, pass_type: type, inputs: Sequence[Any],
             native: Optional[NativeOptions] = None, leaf_modules: Sequence[type] = ()
             ) -> Tuple[torch.fx.GraphModule, PassBase]:
    """``model`` captured with the passes before ``pass_type`` run on it, and the pass under test."""
    gm = captured(model, inputs, leaf_modules)
    before, under_test = split(plan, pass_type, inputs, native)
    PassManager(before)(gm)
    return gm, under_test


def transformed(model: torch.nn.Module, plan: Plan, inputs: Sequence[Any],
                native: Optional[NativeOptions] = None) -> torch.fx.GraphModule:
    """``model`` captured and run through the whole default_pipeline (for the analysis passes)."""
    gm = captured(model, inputs)
    default_pipeline(plan, tuple(inputs), native=native)(gm)
    return gm


class Block(nn.Module):
    """A residual block straight on its input: relu(conv2(relu(conv1(x))) + x)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + x)


class Toy(nn.Module):
    """Two residual blocks and a linear head (tests/test_gates.py's model): two gated units b1, b2."""

    def __init__(self, c: int = 4, classes: int = 3):
        super().__init__()
        self.b1, self.b2 = Block(c), Block(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.b2(self.b1(x)).mean((2, 3)))


def gated_plan(stages: int = 1, **gates) -> Plan:
    return Plan(stages=(Stage(w=8, a=8, g=8),) * stages).with_gates(Gates(**gates))


def target_name(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def ops(gm: torch.fx.GraphModule) -> List[Tuple[str, str, str]]:
    """(op, target, name) of every node but placeholders and the output: the sequence a pass produced."""
    return [(n.op, target_name(n), n.name) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def created_by(gm: torch.fx.GraphModule, pass_name: str) -> List[torch.fx.Node]:
    return [n for n in gm.graph.nodes if meta.inserted(n) is not None and meta.inserted(n).created_by == pass_name]


def fake_quant(t: torch.Tensor, bits: int, dims=None, lo=None, hi=None) -> torch.Tensor:
    """A hand-written quantize-dequantize over t's min/max (per slice along ``dims`` kept; or over [lo, hi]),
    the range widened to hold 0: scale = max/L - min/L, zero point round(-min/scale), codes clamped to
    [-zp, L - zp]."""
    levels = float(2**bits - 1)
    mn = (t.amin(dims, keepdim=True) if dims else t.min()) if lo is None else torch.as_tensor(lo)
    mx = (t.amax(dims, keepdim=True) if dims else t.max()) if hi is None else torch.as_tensor(hi)
    mn, mx = mn.clamp(max=0), mx.clamp(min=0)
    scale = (mx / levels - mn / levels).clamp(min=torch.finfo(t.dtype).tiny)
    zero = torch.round(-mn / scale)
    return torch.maximum(torch.minimum(torch.round(t / scale), levels - zero), -zero) * scale
