"""Shared by the insert passes: adding (or reusing) a named quantizer module and its node."""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch.fx

from fracpass import meta
from fracpass.errors import PassError
from fracpass.pass_base import node_context
from fracpass.plan import QSpec
from fracpass.quant import FULL_PRECISION, Quantizer


def quantized_ops(gm: torch.fx.GraphModule, role: str,
                  gated_bits: Sequence[int] = ()) -> Iterator[Tuple[torch.fx.Node, meta.OpInfo, QSpec]]:
    """Annotated compute nodes whose plan quantizes ``role`` in at least one stage, and gated ops (in a
    unit of find-gated-units) when one of ``gated_bits`` (their gate options' bits for ``role``) is
    below 32: their QSpec holds the widest option, which is 32 when an option leaves ``role`` in full
    precision, while the other options still quantize it."""
    field = meta.PLAN_FIELD[role]
    options_quantize = any(0 < b < FULL_PRECISION for b in gated_bits)
    for node in list(gm.graph.nodes):
        info, spec = meta.op_info(node), meta.qspec(node)
        if info is None or spec is None:
            continue
        if spec.quantizes(field) or (options_quantize and not spec.excluded and meta.gated(node) is not None):
            yield node, info, spec


def quantizer_name(op: torch.fx.Node, role: str, index: int) -> str:
    suffix = meta.SUFFIX[role]
    return f"{op.name}_{suffix}" if index == 0 else f"{op.name}_{suffix}{index}"


def is_quantizer_of(node: object, op: torch.fx.Node, role: str) -> bool:
    info = meta.inserted(node) if isinstance(node, torch.fx.Node) else None
    return info is not None and info.role == role and info.source == op.name


def get_or_add(gm: torch.fx.GraphModule, name: str, make: "type[Quantizer]", op: torch.fx.Node, **config) -> Quantizer:
    """The quantizer module called ``name``, created if absent.

    Reuse is what makes a second capture of the same model (the other train/eval mode) share
    ranges with the first, and what makes running the pipeline twice a no-op.
    """
    try:
        existing = gm.get_submodule(name)
    except AttributeError:
        existing = None
    if existing is None:
        module = make(**config)
        gm.add_submodule(name, module)
        return module
    wanted = {key: list(config[key]) for key in ("stage_bits", "options") if key in config}
    if type(existing) is not make or any(getattr(existing, key).tolist() != value for key, value in wanted.items()):
        raise PassError(
            f"{node_context(op)}\n  the model already has a submodule {name!r} ({type(existing).__name__}) that is not "
            f"this op's {make.__name__}({wanted}); rename that submodule or transform the "
            "original model rather than an already transformed one"
        )
    return existing


def insert_call(gm: torch.fx.GraphModule, name: str, arg: torch.fx.Node, *, before: torch.fx.Node = None,
                after: torch.fx.Node = None, role: str, op: torch.fx.Node, pass_name: str,
                extra: tuple = ()) -> torch.fx.Node:
    ctx = gm.graph.inserting_before(before) if before is not None else gm.graph.inserting_after(after)
    with ctx:
        node = gm.graph.call_module(name, (arg,) + tuple(extra))
    for key in ("nn_module_stack", "stack_trace"):
        if key in op.meta:
            node.meta[key] = op.meta[key]
    meta.set_inserted(node, meta.Inserted(role=role, source=op.name, created_by=pass_name))
    return node


def gate_choices(gm: torch.fx.GraphModule) -> dict:
    """unit name -> the node holding that unit's per-sample one-hot choice (inserted by insert-gates)."""
    import operator

    found = {}
    for node in gm.graph.nodes:
        info = meta.inserted(node)
        if info is not None and info.role == "gate" and node.target is operator.getitem and node.args[1] == 0:
            found[info.source] = node
    return found


def gated_choice(choices: dict, op: torch.fx.Node):
    """The choice node of ``op``'s gated unit, or None for an ungated op."""
    unit = meta.gated(op)
    if unit is None:
        return None
    if unit not in choices:
        raise PassError(f"{node_context(op)}\n  the op belongs to gated unit {unit!r} but no gate branch for it is in "
                        "the graph; run insert-gates before the quantizer passes (fracpass.pipeline.default_pipeline)")
    return choices[unit]
