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
import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import sympy
import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from fracpass import meta, registry
from fracpass.costreport import CostReport, OpCost
from fracpass.errors import FracpassError
from fracpass.quant import FULL_PRECISION, Quantizer

__all__ = ["analyze"]

_DETACHING = {torch.Tensor.detach, "detach", torch.ops.aten.detach.default, torch.ops.aten.alias.default}
# call_function / call_method targets that do many MACs but have no registry rule: never silently 0
_UNCOSTED_NAMES = ("lstm", "gru", "rnn_", "bilinear", "tensordot", "convolution", "conv_tbc", "multi_head_attention")


# -- MACs of calls fracpass cannot see into (leaf modules, fx.wrap'ped functions) ------------------
def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# CPU attention, which torch 2.13's FlopCounterMode leaves out (its custom_mapping takes these as they are)
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}
FLOP_RULES = {**flop_registry, **{op: shape_wrapper(f) for op, f in CPU_ATTENTION_FLOPS.items()}}


class MacCounter(TorchDispatchMode):
    """Counts the MACs (FLOPs / 2) of the aten ops run under it with FlopCounterMode's rules.

    FlopCounterMode itself costs ~1.7 ms to enter (it hooks every module); this mode ~12 us, so
    it can wrap every call of a graph that might hide compute."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    @property
    def macs(self) -> int:
        return self.flops // 2

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = FLOP_RULES.get(func.overloadpacket)
        if rule is not None:
            self.flops += int(rule(*args, **kwargs, out_val=out))
        return out


def _opaque_reason(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return (f"inside leaf module {node.target!r} ({type(gm.get_submodule(node.target)).__name__}): its compute "
                "runs at full precision, unseen by fracpass; un-leaf it (leave it out of leaf_modules) or register "
                "its kind in fracpass.registry")
    name = getattr(node.target, "__name__", str(node.target))
    return (f"opaque call {name!r}: its compute runs at full precision, unseen by fracpass (a torch.fx.wrap'ped or "
            "unregistered function); capture with capture_method='export' to trace through it, or register its kind "
            "in fracpass.registry")


def _user_function(target: Any) -> bool:
    """A Python function from outside torch that fx kept as one call (``torch.fx.wrap``)."""
    module = getattr(target, "__module__", None) or ""
    return callable(target) and not isinstance(target, torch._ops.OpOverload) and \
        module.partition(".")[0] not in ("torch", "_operator", "operator", "builtins", "math", "fracpass")


def _opaque_candidate(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A call fracpass has no MAC rule for, which may hide products (a leaf module, a wrapped function)."""
    if node.op not in ("call_module", "call_function", "call_method") or meta.op_info(node) or meta.inserted(node):
        return False
    return node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Quantizer)


# -- shape propagation ------------------------------------------------------------------------------
class _Recorder(torch.fx.Interpreter):
    """Runs the graph with quantizers bypassed and records each compute op's operand shapes, and
    the MACs of every other call (``opaque``: forward, and the error and weight-gradient products
    of a training step)."""

    def __init__(self, gm: torch.fx.GraphModule, convert=None, watch: Sequence[str] = (),
                 flow: Optional[Dict[str, bool]] = None, num_stages: int = 1):
        super().__init__(gm, garbage_collect_values=True)
        self.convert = convert  # real tensor -> fake tensor, for the symbolic run
        self._converted: Dict[int, Any] = {}
        self.shapes: Dict[str, Tuple[List[Any], Any]] = {}
        self.watch = frozenset(watch)
        self.watched: Dict[str, Tuple[int, ...]] = {}  # output shapes of the nodes named in ``watch``
        self.flow = flow  # None: do not measure opaque calls
        self.num_stages = num_stages
        self.opaque: Dict[str, OpCost] = {}

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
        if self.flow is not None and _opaque_candidate(self.module, node):
            counter = MacCounter()
            # autograd on: modules with a fused inference path (MultiheadAttention) run their training ops
            with counter, torch.enable_grad():
                out = super().run_node(node)
            out = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
            if counter.macs:
                self.opaque[node.name] = self._opaque_cost(node, counter.macs, out)
        else:
            out = super().run_node(node)
        # the op's output: a native fused call wired to its readers returns (out, conv_bn.Handover)
        y = out[0] if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) else out
        if node.name in self.watch and isinstance(y, torch.Tensor):
            self.watched[node.name] = tuple(y.shape)
        info = meta.op_info(node)
        if info is not None:
            self.shapes[node.name] = ([tuple(_shape_of(self, node, slot)) for slot in _operand_slots(info)], tuple(y.shape))
        return out


    def _opaque_cost(self, node: torch.fx.Node, forward: int, out: Any) -> OpCost:
        """The call's MACs as one full-precision op: forward, then the backward products measured
        by running the call again with only the activations, then only the weights, needing grad."""
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        params: Dict[str, torch.Tensor] = {}
        if node.op == "call_module":
            module = self.fetch_attr(node.target)
            params = dict(module.named_parameters())
            call = lambda w, a, k: torch.func.functional_call(module, w, a, k)
        else:
            fn = node.target if node.op == "call_function" else (lambda obj, *a, **k: getattr(obj, node.target)(*a, **k))
            leaves = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, nn.Parameter)]
            params = {str(i): p for i, p in enumerate(leaves)}
            key = {id(p): str(i) for i, p in enumerate(leaves)}
            swap = lambda w: lambda a: w[key[id(a)]] if id(a) in key else a
            call = lambda w, a, k: fn(*pytree.tree_map(swap(w), a), **pytree.tree_map(swap(w), k))
        inputs = [n for n in node.all_input_nodes if isinstance(self.env.get(n), torch.Tensor)
                  and self.env[n].is_floating_point() and not isinstance(self.env[n], nn.Parameter)]
        acts = [n for n in inputs if self.flow.get(n.name, False)]
        weights = {k: p for k, p in params.items() if p.requires_grad}
        # products on the way to both the activations and the weights (attention's dS, dP) run once in a
        # training step: the error products are those of a step that needs no weight gradient, the rest
        # is the weight-gradient products'
        total = self._backward_macs(node, call, params, acts, weights) if acts or weights else 0
        error = self._backward_macs(node, call, params, acts, {}) if acts and weights else total if acts else 0
        weight = total - error
        act_elems = sum(self.env[n].numel() for n in inputs)
        out_elems = sum(t.numel() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        fp32 = (FULL_PRECISION,) * self.num_stages
        path = str(node.target) if node.op == "call_module" else registry.module_path(self.module, node)
        return OpCost(node.name, "opaque", path, ("act", "weight"), forward, (error, weight),
                      (act_elems, sum(p.numel() for p in params.values())), out_elems, fp32, fp32, fp32,
                      _opaque_reason(self.module, node))

    def _backward_macs(self, node, call, params, acts, weights) -> int:
        env = dict(self.env)
        for n in acts:
            env[n] = env[n].detach().requires_grad_(True)
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        w = {k: p.detach().requires_grad_(k in weights) for k, p in params.items()}
        with torch.enable_grad():
            out = call(w, args, kwargs)
            outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            wrt = [env[n] for n in acts] + [w[k] for k in weights]
            if not outs:
                return 0
            counter = MacCounter()
            with counter:
                torch.autograd.grad(outs, wrt, [torch.ones_like(t) for t in outs], allow_unused=True)
        return counter.macs


def _operand_slots(info: meta.OpInfo) -> List[Tuple[Any, ...]]:
    slots = list(info.act_args) + list(info.weight_args)
    return sorted(slots, key=lambda s: (s[0] if isinstance(s[0], int) else 99, s[1:]))


def _shape_of(recorder: _Recorder, node: torch.fx.Node, slot) -> Any:
    value = registry.get_slot(node, slot)
    return recorder.env[value].shape if isinstance(value, torch.fx.Node) else torch.as_tensor(value).shape


def flat_inputs(gm: torch.fx.GraphModule, args, kwargs):
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
def state_kept(gm: nn.Module):
    """Run the model without leaving a trace: buffers (BatchNorm statistics), the RNG and native calls'
    records of their last call (what ``summary`` reports of the user's last batch) restored."""
    from fracpass.native.site import NativeSite

    saved = {k: v.detach().clone() for k, v in gm.named_buffers()}
    records = {m: dataclasses.replace(m.last) for m in gm.modules() if isinstance(m, NativeSite)}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            yield
        finally:
            for k, v in gm.named_buffers():
                v.copy_(saved[k])
            for m, last in records.items():
                m.last = last


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


def uncosted(gm: torch.fx.GraphModule) -> List[Tuple[str, str]]:
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
            elif node.op == "call_function" and _user_function(node.target):
                found.append((node.name, _opaque_reason(gm, node)))
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
    flat = flat_inputs(gm, args, kwargs)
    flow = _needs_grad(gm)
    with state_kept(gm):
        recorder = _Recorder(gm, watch=watch, flow=flow, num_stages=num_stages)
        recorder.run(*flat)
    ops, skipped = _op_costs(gm, recorder.shapes, flow, num_stages, int)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    ops = sorted(ops + list(recorder.opaque.values()), key=lambda o: order[o.op])
    batch = next((int(x.shape[0]) for x in flat if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
    unseen = [(name, why) for name, why in uncosted(gm) if name not in recorder.opaque]
    report = CostReport(ops, batch, num_stages, stage, target, unseen + skipped)
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

    flat = [fake_input(x) for x in flat_inputs(gm, args, kwargs)]
    with mode, torch.no_grad():
        recorder = _Recorder(gm, convert=lambda t: mode.from_tensor(t, static_shapes=True))
        recorder.run(*flat)

    def to_expr(value):
        expr = value.node.expr if isinstance(value, torch.SymInt) else sympy.Integer(int(value))
        return sympy.sympify(expr).xreplace(names)

    report.symbols = {str(s): s for s in names.values()}
    return _op_costs(gm, recorder.shapes, flow, num_stages, to_expr)[0]
