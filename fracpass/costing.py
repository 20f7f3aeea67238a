"""Cost analysis: MACs of every compute op from propagated shapes, BitOPs per stage, energy and
latency on a hardware profile, whole-schedule training totals, and symbolic counts (sympy).

Products counted per op (FracTrain's accounting): the forward product (operand bits x operand
bits, e.g. a x w), and in backward one product per operand that needs a gradient: the error
product for an activation operand (g x bits of the other operand) and the weight-gradient product
for a weight operand (g x a). An input that needs no gradient (the data) gets no error product.
Bytes moved per product: each operand at its bit width, the result at 32 bits.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, Sequence, Tuple

import sympy
import torch
import torch.fx
from torch import nn

from fracpass import meta, registry
from fracpass.costreport import CostReport, OpCost
from fracpass.errors import FracpassError
from fracpass.quant import FULL_PRECISION, Quantizer

__all__ = ["analyze"]

_DETACHING = {torch.Tensor.detach, "detach", torch.ops.aten.detach.default, torch.ops.aten.alias.default}
# call_function / call_method targets that do many MACs but have no registry rule: never silently 0
_UNCOSTED_NAMES = ("lstm", "gru", "rnn_", "bilinear", "tensordot", "convolution", "conv_tbc", "multi_head_attention")


# -- shape propagation ------------------------------------------------------------------------------
class _Recorder(torch.fx.Interpreter):
    """Runs the graph with quantizers bypassed and records each compute op's operand shapes."""

    def __init__(self, gm: torch.fx.GraphModule, convert=None, watch: Sequence[str] = ()):
        super().__init__(gm, garbage_collect_values=True)
        self.convert = convert  # real tensor -> fake tensor, for the symbolic run
        self._converted: Dict[int, Any] = {}
        self.shapes: Dict[str, Tuple[List[Any], Any]] = {}
        self.watch = frozenset(watch)
        self.watched: Dict[str, Tuple[int, ...]] = {}  # output shapes of the nodes named in ``watch``

    def _tensor(self, value):
        if self.convert is None or not isinstance(value, torch.Tensor):
            return value
        if id(value) not in self._converted:
            self._converted[id(value)] = self.convert(value)
        return self._converted[id(value)]

    def fetch_attr(self, target: str):
        return self._tensor(super().fetch_attr(target))

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, Quantizer):
            return args[0]
        if self.convert is None:
            return module(*args, **kwargs)
        state = {k: self._tensor(v) for k, v in list(module.named_parameters()) + list(module.named_buffers())}
        return torch.func.functional_call(module, state, args, kwargs)

    def run_node(self, node):
        out = super().run_node(node)
        if node.name in self.watch and isinstance(out, torch.Tensor):
            self.watched[node.name] = tuple(out.shape)
        info = meta.op_info(node)
        if info is not None:
            self.shapes[node.name] = ([tuple(_shape_of(self, node, slot)) for slot in _operand_slots(info)], tuple(out.shape))
        return out


def _operand_slots(info: meta.OpInfo) -> List[Tuple[Any, ...]]:
    slots = list(info.act_args) + list(info.weight_args)
    return sorted(slots, key=lambda s: (s[0] if isinstance(s[0], int) else 99, s[1:]))


def _shape_of(recorder: _Recorder, node: torch.fx.Node, slot) -> Any:
    value = registry.get_slot(node, slot)
    return recorder.env[value].shape if isinstance(value, torch.fx.Node) else torch.as_tensor(value).shape


def _flat_inputs(gm: torch.fx.GraphModule, args, kwargs):
    codegen = gm.graph._codegen
    if isinstance(codegen, torch.fx.graph._PyTreeCodeGen):
        import torch.fx._pytree as fx_pytree

        return fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), codegen.pytree_info.in_spec)
    flat = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if i < len(args):
            flat.append(args[i])
        elif node.target in kwargs:
            flat.append(kwargs[node.target])
        elif node.args:  # the parameter's default
            flat.append(node.args[0])
        else:
            raise FracpassError(f"cost: no example value for input {node.target!r}; pass it in example_inputs or "
                                "example_kwargs")
    return flat


@contextlib.contextmanager
def _state_kept(gm: nn.Module):
    """Run the model without leaving a trace: buffers (BatchNorm statistics) and the RNG restored."""
    saved = {k: v.detach().clone() for k, v in gm.named_buffers()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            yield
        finally:
            for k, v in gm.named_buffers():
                v.copy_(saved[k])


def _needs_grad(gm: torch.fx.GraphModule) -> Dict[str, bool]:
    """Which nodes carry a gradient in training: those downstream of a trainable parameter."""
    flow: Dict[str, bool] = {}
    for node in gm.graph.nodes:
        inputs = any(flow.get(n.name, False) for n in node.all_input_nodes)
        if node.op == "placeholder":
            flow[node.name] = False
        elif node.op == "get_attr":
            value = registry.parameter_of(gm, node)
            flow[node.name] = bool(value is not None and value.requires_grad)
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, Quantizer):  # a gated one also reads its gate's choice: not its data
                flow[node.name] = isinstance(node.args[0], torch.fx.Node) and flow.get(node.args[0].name, False)
                continue
            flow[node.name] = inputs or any(p.requires_grad for p in module.parameters())
        elif node.target in _DETACHING:
            flow[node.name] = False
        else:
            flow[node.name] = inputs
    return flow


def _uncosted(gm: torch.fx.GraphModule) -> List[Tuple[str, str]]:
    found = []
    for node in gm.graph.nodes:
        if meta.op_info(node) or meta.inserted(node):
            continue
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Bilinear, nn.Transformer,
                                   nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) or (
                    not type(module).__module__.startswith("torch.nn") and any(True for _ in module.parameters())):
                found.append((node.name, f"inside leaf module {node.target!r} ({type(module).__name__}): its compute "
                                         "ops are not visible to fracpass; un-leaf it or register its kind"))
        elif node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target)).lower()
            if any(k in name for k in _UNCOSTED_NAMES):
                found.append((node.name, f"unsupported op kind {name!r}: no rule in fracpass.registry"))
    return found


def _op_costs(gm, shapes: Dict[str, Any], flow: Dict[str, bool], num_stages: int, to_value) -> Tuple[List[OpCost], List[Tuple[str, str]]]:
    ops, skipped = [], []
    for node in gm.graph.nodes:
        info, spec = meta.op_info(node), meta.qspec(node)
        if info is None or node.name not in shapes:
            continue
        entry = registry.lookup(gm, node)
        operand_shapes, out_shape = shapes[node.name]
        slots = _operand_slots(info)
        roles = tuple("weight" if s in info.weight_args else "act" for s in slots)
        if info.module_weight:  # an unlowered module call: its weight is the module's parameter
            weight = gm.get_submodule(node.target).weight
            operand_shapes, roles = operand_shapes + [tuple(weight.shape)], roles + ("weight",)
            grads = [_flows(flow, node, slots[0]), weight.requires_grad]
        else:
            grads = [_flows(flow, node, s) for s in slots]
        try:
            forward, backward = entry.macs(operand_shapes, out_shape, node)
        except (NotImplementedError, TypeError, IndexError) as e:
            skipped.append((node.name, f"{info.kind}: {e}"))
            continue
        if len(backward) != len(grads):
            skipped.append((node.name, f"{info.kind}: its MAC rule gave {len(backward)} backward products for "
                                       f"{len(grads)} operands"))
            continue
        backward = tuple(to_value(m) if need else 0 for m, need in zip(backward, grads))
        excluded = spec.excluded if spec else ""
        bits = {f: (FULL_PRECISION,) * num_stages if excluded or spec is None else spec.stage_bits(f) for f in "wag"}
        ops.append(OpCost(node.name, info.kind, info.module_path, roles, to_value(forward), backward,
                          tuple(to_value(math.prod(s) if s else 1) for s in operand_shapes),
                          to_value(math.prod(out_shape) if out_shape else 1), bits["w"], bits["a"], bits["g"], excluded))
    return ops, skipped


def _flows(flow: Dict[str, bool], node: torch.fx.Node, slot) -> bool:
    value = registry.get_slot(node, slot)
    return isinstance(value, torch.fx.Node) and flow.get(value.name, False)


def analyze(gm: torch.fx.GraphModule, args: Sequence[Any], kwargs: Dict[str, Any], num_stages: int, stage: int,
            target=None, watch: Sequence[str] = ()) -> CostReport:
    """Propagate the example inputs' shapes through ``gm`` and cost every annotated compute op.

    ``watch``: node names whose output shapes the report keeps in ``node_shapes``."""
    flat = _flat_inputs(gm, args, kwargs)
    with _state_kept(gm):
        recorder = _Recorder(gm, watch=watch)
        recorder.run(*flat)
    flow = _needs_grad(gm)
    ops, skipped = _op_costs(gm, recorder.shapes, flow, num_stages, int)
    batch = next((int(x.shape[0]) for x in flat if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
    report = CostReport(ops, batch, num_stages, stage, target, _uncosted(gm) + skipped)
    report.node_shapes = dict(recorder.watched)
    report._symbolic = lambda: _symbolic_ops(gm, args, kwargs, flow, num_stages, report)
    return report


def _symbolic_ops(gm, args, kwargs, flow, num_stages, report: CostReport) -> List[OpCost]:
    """The same op costs with the example inputs' batch and spatial dims as sympy symbols."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    names: Dict[Any, sympy.Symbol] = {}

    def dynamic_dims(x: torch.Tensor) -> List[Tuple[int, str]]:
        if x.dim() == 0:
            return []
        dims = [(0, "N")]
        if x.is_floating_point() and x.dim() == 4:
            dims += [(2, "H"), (3, "W")]
        elif x.is_floating_point() and x.dim() == 3:
            dims += [(2, "L")]
        elif not x.is_floating_point() and x.dim() == 2:
            dims += [(1, "T")]
        return dims

    def fake_input(x):
        if not isinstance(x, torch.Tensor):
            return x
        dims = dict(dynamic_dims(x))
        # size-1 dims specialise to 1; the numeric report covers that case
        context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if d in dims and x.shape[d] > 1
                                                          else DimDynamic.STATIC for d in range(x.dim())])
        fake = mode.from_tensor(x, symbolic_context=context)
        for d, name in dims.items():
            size = fake.shape[d]
            if isinstance(size, torch.SymInt):
                names[size.node.expr] = sympy.Symbol(name, positive=True, integer=True)
        return fake

    flat = [fake_input(x) for x in _flat_inputs(gm, args, kwargs)]
    with mode, torch.no_grad():
        recorder = _Recorder(gm, convert=lambda t: mode.from_tensor(t, static_shapes=True))
        recorder.run(*flat)

    def to_expr(value):
        expr = value.node.expr if isinstance(value, torch.SymInt) else sympy.Integer(int(value))
        return sympy.sympify(expr).xreplace(names)

    report.symbols = {str(s): s for s in names.values()}
    return _op_costs(gm, recorder.shapes, flow, num_stages, to_expr)[0]
