"""Keys under which fracpass keeps per-node state in ``node.meta``, and typed accessors.

Values stored under these keys are frozen dataclasses; passes read and write them only through
the helpers below, never as raw dicts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    import torch.fx

    from fracpass.plan import QSpec

OP = "fracpass.op"  # OpInfo: the registry's view of a compute node
QSPEC = "fracpass.qspec"  # QSpec: per-stage bits per role, or why the op is excluded
ROLE = "fracpass.role"  # Inserted: on nodes a pass created
MODULE_PATH = "fracpass.module_path"  # str: module an op was lowered from (call_module -> call_function)
GATED = "fracpass.gated"  # str: name of the gated unit a compute op belongs to
UNIT = "fracpass.unit"  # Unit: on a unit's merge node (the block's add; the op itself for granularity "op")

ROLES = ("act", "weight", "grad")
SUFFIX = {"act": "aq", "weight": "wq", "grad": "gq"}
PLAN_FIELD = {"act": "a", "weight": "w", "grad": "g"}  # role -> its field in Stage / Rule / QSpec


@dataclass(frozen=True)
class OpInfo:
    """What the op registry says about one compute node."""

    kind: str  # registry kind, e.g. "conv2d", "linear", "matmul", "sdpa"
    module_path: str  # dotted path of the module the op belongs to ("" for the root)
    act_args: Tuple[tuple, ...]  # slots of activation inputs: (i,) args[i], (i, j) args[i][j], ("kw",)
    weight_args: Tuple[tuple, ...]  # slots of weight inputs
    weight_axes: Tuple[Optional[int], ...]  # output-channel axis of each weight (None: per-tensor)
    traits: Tuple[str, ...] = ()  # extra tags rules can match, e.g. ("grouped", "depthwise")
    module_weight: bool = False  # a call_module whose weight is reached by lowering it first

    def matches_kind(self, pattern: str) -> bool:
        from fnmatch import fnmatchcase

        return fnmatchcase(self.kind, pattern) or any(fnmatchcase(t, pattern) for t in self.traits)


@dataclass(frozen=True)
class Inserted:
    """Provenance of a node a fracpass pass inserted."""

    role: str  # "act" | "weight" | "grad" | "gate"
    source: str  # name of the compute node it serves
    created_by: str  # pass name


@dataclass(frozen=True)
class Unit:
    """One gated unit: the ops one gate decision covers, found from graph structure."""

    name: str  # gate name: parameters live under ``gates.<name>``
    index: int  # position in graph order (the order the shared LSTM visits units)
    input: str  # node whose output the gate reads (the block's input; the op's activation input)
    ops: Tuple[str, ...]  # compute ops the decision covers
    main_arg: Optional[int] = None  # block granularity: which add operand is the residual branch


def op_info(node: "torch.fx.Node") -> Optional[OpInfo]:
    return node.meta.get(OP)


def set_op_info(node: "torch.fx.Node", info: OpInfo) -> None:
    node.meta[OP] = info


def qspec(node: "torch.fx.Node") -> Optional["QSpec"]:
    return node.meta.get(QSPEC)


def set_qspec(node: "torch.fx.Node", spec: "QSpec") -> None:
    node.meta[QSPEC] = spec


def inserted(node: "torch.fx.Node") -> Optional[Inserted]:
    return node.meta.get(ROLE)


def set_inserted(node: "torch.fx.Node", info: Inserted) -> None:
    node.meta[ROLE] = info


def gated(node: "torch.fx.Node") -> Optional[str]:
    return node.meta.get(GATED)


def set_gated(node: "torch.fx.Node", unit: str) -> None:
    node.meta[GATED] = unit


def unit(node: "torch.fx.Node") -> Optional[Unit]:
    return node.meta.get(UNIT)


def set_unit(node: "torch.fx.Node", value: Unit) -> None:
    node.meta[UNIT] = value
