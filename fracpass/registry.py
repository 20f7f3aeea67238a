"""The op registry: one entry per compute-op kind, at every level a graph can be captured at.

An entry says which nn modules, functional or tensor calls and aten overloads are that kind, which
operands are activations and which are weights (with the weight's output-channel axis), what
traits a rule can match on (``grouped``, ``depthwise``) and, for module kinds, how to lower the
module call to its functional form so a weight quantizer can sit between the parameter and the op.

Register a new kind with ``register(OpKind(...))``; every pass picks it up.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fracpass.errors import RegistryError
from fracpass.meta import MODULE_PATH, OpInfo

__all__ = ["Operand", "OpKind", "register", "classify", "lookup", "registered_kinds", "get_slot", "set_slot"]

aten = torch.ops.aten

# A slot says where an operand sits in node.args / node.kwargs: (i,) is args[i], (i, j) is
# args[i][j] (aten.einsum's operand list), ("name",) is kwargs["name"].
Slot = Tuple[Any, ...]


@dataclass(frozen=True)
class Operand:
    """One tensor operand of a compute op."""

    pos: int  # position in args (after ``self`` for tensor methods: the receiver is pos 0)
    name: str  # keyword name, for calls that pass it by keyword
    role: str  # "act", "weight" (always the op's weight) or "either" (a weight only if a parameter)
    axis: Optional[int] = 0  # output-channel axis if it is a weight; None = per-tensor


@dataclass(frozen=True)
class OpKind:
    kind: str
    operands: Tuple[Operand, ...]
    modules: Tuple[type, ...] = ()
    functions: Tuple[Any, ...] = ()  # python callables and aten OpOverloads
    methods: Tuple[str, ...] = ()  # Tensor method names
    module_act: int = 0  # activation input position of the module call
    lower: Optional[Callable[[torch.fx.GraphModule, torch.fx.Node, nn.Module], torch.fx.Node]] = None
    traits: Callable[[torch.fx.GraphModule, torch.fx.Node], Tuple[str, ...]] = field(default=lambda gm, n: ())
    applies: Callable[[torch.fx.GraphModule, torch.fx.Node], bool] = field(default=lambda gm, n: True)
    # for operands of variadic ops (einsum) — returns the operand slots directly
    variadic: Optional[Callable[[torch.fx.Node], Tuple[Slot, ...]]] = None
    # cost: (operand shapes in operand order, output shape, node) -> (forward MACs, backward MACs
    # of the product giving each operand's gradient). None: the op is listed as "not costed".
    macs: Optional[Callable[[Sequence[Sequence[Any]], Sequence[Any], torch.fx.Node], Tuple[Any, Tuple[Any, ...]]]] = None


_BY_MODULE: Dict[type, OpKind] = {}
_BY_FUNCTION: Dict[Any, OpKind] = {}
_BY_METHOD: Dict[str, OpKind] = {}
_KINDS: Dict[str, OpKind] = {}


def register(entry: OpKind) -> OpKind:
    """Add an op kind (or replace the one of the same name)."""
    _KINDS[entry.kind] = entry
    for m in entry.modules:
        _BY_MODULE[m] = entry
    for f in entry.functions:
        _BY_FUNCTION[f] = entry
    for name in entry.methods:
        _BY_METHOD[name] = entry
    return entry


def add_functions(kind: str, *functions: Callable) -> OpKind:
    """Make ``functions`` (e.g. native calls that compute the same op) instances of the registered ``kind``:
    the same operands, MAC rule and cost as its other functions."""
    if kind not in _KINDS:
        raise RegistryError(f"add_functions: no op kind {kind!r} is registered; registered: {registered_kinds()}")
    entry = _KINDS[kind]
    return register(dataclasses.replace(entry, functions=entry.functions + tuple(functions)))


def registered_kinds() -> Tuple[str, ...]:
    return tuple(sorted(_KINDS))


def lookup(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[OpKind]:
    """The registry entry for a node, or None if it is not a compute op fracpass knows."""
    if node.op == "call_module":
        entry = _BY_MODULE.get(type(gm.get_submodule(node.target)))
    elif node.op == "call_function":
        entry = _BY_FUNCTION.get(node.target)
        if entry is None and isinstance(node.target, torch._ops.OpOverload):
            entry = _BY_FUNCTION.get(node.target.overloadpacket)
    elif node.op == "call_method":
        entry = _BY_METHOD.get(node.target)
    else:
        entry = None
    if entry is not None and not entry.applies(gm, node):
        return None
    return entry


def module_path(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """Dotted path of the module an op belongs to, on either capture path."""
    if node.op == "call_module":
        return str(node.target)
    if MODULE_PATH in node.meta:
        return node.meta[MODULE_PATH]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, owner = list(stack.values())[-1]
        path = "" if path in ("", "L['self']") else str(path)
        if _is_mha(owner):
            return _mha_part(node, path) or path
        return path
    return ""


def _is_mha(owner: Any) -> bool:
    """``nn.MultiheadAttention`` as an nn_module_stack entry names it: a class (fx), or its qualified name (export)."""
    if isinstance(owner, type):
        return issubclass(owner, nn.MultiheadAttention)
    return str(owner).split(".")[-1].rstrip("'>") == "MultiheadAttention"


# nn.MultiheadAttention's projections as print(model) and its state_dict name them
_MHA_PROJECTIONS = {"in_proj_weight": "in_proj", "q_proj_weight": "q_proj", "k_proj_weight": "k_proj",
                    "v_proj_weight": "v_proj"}


def _mha_part(node: torch.fx.Node, path: str) -> Optional[str]:
    """Inside ``nn.MultiheadAttention``, whose forward reads its projections' weights rather than calling
    them, the projection an op computes: ``<path>.out_proj`` or ``<path>.in_proj`` (``q_proj``/``k_proj``/
    ``v_proj`` with separate weights), found from the weight it multiplies by, so plan rules can tell them
    apart; None for the attention products."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    for _ in range(4):  # through the split/chunk/getitem that cut the packed in-projection weight
        if not isinstance(weight, torch.fx.Node) or weight.op == "get_attr":
            break
        weight = weight.args[0] if weight.args else None
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    owner, _, name = str(weight.target).rpartition(".")
    if name == "weight" and owner.endswith("out_proj"):
        return f"{path}.out_proj" if path else "out_proj"
    part = _MHA_PROJECTIONS.get(name)
    return None if part is None else (f"{path}.{part}" if path else part)


def get_slot(node: torch.fx.Node, slot: Slot) -> Any:
    if isinstance(slot[0], str):
        return node.kwargs.get(slot[0])
    value = node.args[slot[0]]
    return value[slot[1]] if len(slot) > 1 else value


def set_slot(node: torch.fx.Node, slot: Slot, value: Any) -> None:
    if isinstance(slot[0], str):
        node.update_kwarg(slot[0], value)
    elif len(slot) > 1:
        seq = list(node.args[slot[0]])
        seq[slot[1]] = value
        node.update_arg(slot[0], type(node.args[slot[0]])(seq))
    else:
        node.update_arg(slot[0], value)


def _find_slot(node: torch.fx.Node, operand: Operand) -> Optional[Slot]:
    if operand.pos < len(node.args):
        return (operand.pos,)
    if operand.name in node.kwargs:
        return (operand.name,)
    return None


def parameter_of(gm: torch.fx.GraphModule, value: Any) -> Optional[torch.Tensor]:
    """The parameter a get_attr node reads, or None."""
    if not isinstance(value, torch.fx.Node) or value.op != "get_attr":
        return None
    obj: Any = gm
    try:
        for part in str(value.target).split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return None
    return obj if isinstance(obj, nn.Parameter) else None


def classify(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[OpInfo]:
    """What the registry says about ``node``: None unless it is a known compute op."""
    entry = lookup(gm, node)
    if entry is None:
        return None
    path = module_path(gm, node)
    traits = tuple(entry.traits(gm, node))
    if node.op == "call_module":
        return OpInfo(entry.kind, path, act_args=((entry.module_act,),), weight_args=(), weight_axes=(), traits=traits,
                      module_weight=True)
    acts, weights, axes = [], [], []
    if entry.variadic is not None:
        for slot, axis in entry.variadic(node):
            is_weight = parameter_of(gm, get_slot(node, slot)) is not None
            (weights if is_weight else acts).append(slot)
            if is_weight:
                axes.append(axis)
    else:
        for operand in entry.operands:
            slot = _find_slot(node, operand)
            if slot is None or not isinstance(get_slot(node, slot), torch.fx.Node):
                continue
            is_weight = operand.role == "weight" or (
                operand.role == "either" and parameter_of(gm, get_slot(node, slot)) is not None
            )
            if is_weight:
                weights.append(slot)
                axes.append(operand.axis)
            else:
                acts.append(slot)
    return OpInfo(entry.kind, path, act_args=tuple(acts), weight_args=tuple(weights), weight_axes=tuple(axes),
                  traits=traits)


# -- traits -------------------------------------------------------------------------------------
def _shape_of(gm: torch.fx.GraphModule, value: Any) -> Optional[torch.Size]:
    param = parameter_of(gm, value)
    if param is not None:
        return param.shape
    val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    return getattr(val, "shape", None)


def _conv_traits(groups_pos: int) -> Callable[[torch.fx.GraphModule, torch.fx.Node], Tuple[str, ...]]:
    def traits(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Tuple[str, ...]:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            groups, per_group_in = mod.groups, mod.weight.shape[1]
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                per_group_in = mod.in_channels // mod.groups
        else:
            groups = node.args[groups_pos] if len(node.args) > groups_pos else node.kwargs.get("groups", 1)
            shape = _shape_of(gm, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
            per_group_in = shape[1] if shape is not None and len(shape) > 1 else None
            if node.target in _TRANSPOSED and shape is not None:
                per_group_in = shape[0] // groups if isinstance(groups, int) else None
        if not isinstance(groups, int) or groups == 1:
            return ()
        return ("grouped", "depthwise") if per_group_in == 1 else ("grouped",)

    return traits


# -- lowering module calls to functional form ---------------------------------------------------
def _lower(gm: torch.fx.GraphModule, node: torch.fx.Node, build: Callable[[nn.Module, Any, Any, Any], Tuple[Any, tuple]]) -> torch.fx.Node:
    """Replace ``call_module`` with ``call_function`` over get_attr'd weight and bias."""
    mod = gm.get_submodule(node.target)
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{node.target}.weight")
        bias = graph.get_attr(f"{node.target}.bias") if getattr(mod, "bias", None) is not None else None
        fn, args = build(mod, node.args[0], weight, bias)
        new = graph.call_function(fn, args)
    new.meta.update(node.meta)
    new.meta[MODULE_PATH] = str(node.target)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    new.name = node.name  # keep the op's name: quantizer names and snapshots derive from it
    return new


def _padded_conv(fn):
    def conv_padded(x, weight, bias, stride, dilation, groups, pad, mode):
        return fn(F.pad(x, pad, mode=mode), weight, bias, stride, 0, dilation, groups)

    conv_padded.__name__ = f"{fn.__name__}_padded"
    conv_padded.__qualname__ = conv_padded.__name__
    return conv_padded


_PADDED = {}


def _conv_lowering(fn):
    def build(mod, x, weight, bias):
        if mod.padding_mode != "zeros":
            padded = _PADDED.setdefault(fn, _padded_conv(fn))
            return padded, (x, weight, bias, mod.stride, mod.dilation, mod.groups,
                            tuple(mod._reversed_padding_repeated_twice), mod.padding_mode)
        return fn, (x, weight, bias, mod.stride, mod.padding, mod.dilation, mod.groups)

    return lambda gm, node, mod=None: _lower(gm, node, build)


def _conv_transpose_lowering(fn):
    def build(mod, x, weight, bias):
        return fn, (x, weight, bias, mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation)

    return lambda gm, node, mod=None: _lower(gm, node, build)


def _linear_lowering(gm, node, mod=None):
    return _lower(gm, node, lambda mod, x, w, b: (F.linear, (x, w, b)))


# -- MAC rules (shapes may hold SymInts: the same rule gives numeric and symbolic counts) ---------
def _numel(shape) -> Any:
    return math.prod(shape) if len(shape) else 1


def _bilinear(fwd) -> Tuple[Any, Tuple[Any, Any]]:
    return fwd, (fwd, fwd)  # each operand's gradient is one product as large as the forward one


def conv_macs(shapes, out, node=None):
    """out elements x (Cin / groups x kernel), the weight's per-output-channel size."""
    x, w = shapes
    return _bilinear(_numel(out) * _numel(w[1:]))


def conv_transpose_macs(shapes, out, node=None):
    """every input element meets (Cout / groups x kernel) weights: weight is (Cin, Cout/g, *k)."""
    x, w = shapes
    return _bilinear(_numel(x) * _numel(w[1:]))


def linear_macs(shapes, out, node=None):
    x, w = shapes
    return _bilinear(_numel(out) * x[-1])


def matmul_macs(shapes, out, node=None):
    a, _ = shapes
    return _bilinear(_numel(out) * a[-1])


def sdpa_macs(shapes, out, node=None):
    """Q K^T (L x S x E) and P V (L x S x Ev) per batch-head; backward: dQ = dS K and dP = dO V^T
    for the query, dK = dS^T Q for the key, dV = P^T dO for the value (2x forward in all)."""
    q, k, v = shapes
    heads = _numel(q[:-2])
    length, source, e, ev = q[-2], k[-2], q[-1], v[-1]
    qk, pv = heads * length * source * e, heads * length * source * ev
    return qk + pv, (qk + pv, qk, pv)


def einsum_macs(shapes, out, node):
    """out elements x the product of the contracted (summed-over) letters' sizes; two operands."""
    if len(shapes) != 2:
        raise NotImplementedError(f"einsum with {len(shapes)} operands has no MAC rule")
    lhs, arrow, rhs = str(node.args[0]).replace(" ", "").partition("->")
    letters = [c for c in lhs if c.isalpha()]
    if not arrow:
        rhs = "".join(c for c in set(letters) if letters.count(c) == 1)
    sizes: Dict[str, Any] = {}
    for term, shape in zip(lhs.split(","), shapes):
        head, ellipsis, tail = term.partition("...")
        pairs = zip(head, shape) if not ellipsis else list(zip(head, shape[: len(head)])) + list(
            zip(tail, shape[len(shape) - len(tail):]))
        for letter, size in pairs:
            sizes.setdefault(letter, size)
    contracted = [sizes[c] for c in sorted(set(letters)) if c not in rhs]
    return _bilinear(_numel(out) * (math.prod(contracted) if contracted else 1))


# -- the built-in kinds -------------------------------------------------------------------------
_X, _W = Operand(0, "input", "act"), Operand(1, "weight", "weight", axis=0)
_TRANSPOSED = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
               F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}

for _n, _mod, _fn, _at in (
    (1, nn.Conv1d, F.conv1d, (aten.conv1d.default, aten.conv1d.padding)),
    (2, nn.Conv2d, F.conv2d, (aten.conv2d.default, aten.conv2d.padding)),
    (3, nn.Conv3d, F.conv3d, (aten.conv3d.default, aten.conv3d.padding)),
):
    register(OpKind(f"conv{_n}d", (_X, _W), modules=(_mod,), functions=(_fn, *_at),
                    lower=_conv_lowering(_fn), traits=_conv_traits(6), macs=conv_macs))

for _n, _mod, _fn, _at in (
    (1, nn.ConvTranspose1d, F.conv_transpose1d, aten.conv_transpose1d.default),
    (2, nn.ConvTranspose2d, F.conv_transpose2d, aten.conv_transpose2d.input),
    (3, nn.ConvTranspose3d, F.conv_transpose3d, aten.conv_transpose3d.input),
):
    # ConvTranspose weights are (in, out / groups, ...): output channels sit on axis 1.
    register(OpKind(f"conv_transpose{_n}d", (_X, Operand(1, "weight", "weight", axis=1)), modules=(_mod,),
                    functions=(_fn, _at), lower=_conv_transpose_lowering(_fn), traits=_conv_traits(6),
                    macs=conv_transpose_macs))

register(OpKind("linear", (_X, _W), modules=(nn.Linear,), functions=(F.linear, aten.linear.default),
                lower=_linear_lowering, macs=linear_macs))

# Products of two tensors: an operand is a weight only when it is a parameter. Output channels
# of a parameter on the right are its last axis, of one on the left its second-to-last.
_A = Operand(0, "input", "either", axis=-2)
_B = Operand(1, "other", "either", axis=-1)
register(OpKind("matmul", (_A, _B), functions=(torch.matmul, operator.matmul, aten.matmul.default),
                methods=("matmul", "__matmul__"), macs=matmul_macs))
register(OpKind("mm", (_A, Operand(1, "mat2", "either", axis=-1)), functions=(torch.mm, aten.mm.default), methods=("mm",),
                macs=matmul_macs))
register(OpKind("bmm", (_A, Operand(1, "mat2", "either", axis=-1)), functions=(torch.bmm, aten.bmm.default), methods=("bmm",),
                macs=matmul_macs))
register(OpKind("addmm", (Operand(1, "mat1", "either", axis=-2), Operand(2, "mat2", "either", axis=-1)),
                functions=(torch.addmm, aten.addmm.default), methods=("addmm",), macs=matmul_macs))
register(OpKind("baddbmm", (Operand(1, "batch1", "either", axis=-2), Operand(2, "batch2", "either", axis=-1)),
                functions=(torch.baddbmm, aten.baddbmm.default), methods=("baddbmm",), macs=matmul_macs))
register(OpKind("sdpa", (Operand(0, "query", "act"), Operand(1, "key", "act"), Operand(2, "value", "act")),
                functions=(F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default), macs=sdpa_macs))


def _einsum_operands(node: torch.fx.Node):
    """Operand slots of einsum(eq, a, b, ...) or einsum(eq, [a, b, ...]) with each one's output axis."""
    eq = str(node.args[0]).replace(" ", "")
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if not out and "..." not in lhs:
        out = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
    listed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    slots = []
    for i, term in enumerate(terms):
        axis = next((j for j, c in enumerate(term.replace("...", "")) if c in out), None)
        if "..." in term and axis is not None:
            axis = axis - len(term.replace("...", ""))  # count from the end past an ellipsis
        slots.append(((1, i) if listed else (1 + i,), axis))
    return tuple(slots)


def _einsum_is_contraction(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], str):
        return False
    eq = node.args[0].replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) < 2:
        return False
    letters = {c for c in lhs if c.isalpha()}
    if not arrow:
        out = "".join(c for c in letters if lhs.count(c) == 1)
    return any(c not in out for c in letters)


register(OpKind("einsum", (), functions=(torch.einsum, aten.einsum.default), applies=_einsum_is_contraction,
                variadic=_einsum_operands, macs=einsum_macs))
