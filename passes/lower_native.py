"""lower-native: each quantized compute op and its quantizers become one native call (fracpass.native)."""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F

from fracpass import meta
from fracpass.native import breaks, calls, layout, units
from fracpass.native.options import CONV_TRANSPOSE_SIMULATED, NativeOptions
from fracpass.native.site import NATIVE, NativeInfo, NativeSite
from fracpass.pass_base import PassBase, PassResult
from fracpass.passes._quantizers import is_quantizer_of


class LowerNativePass(PassBase):
    """Replace each quantized linear / matmul group by one native call that picks its path per call::

        x -> linear_aq -> linear(., linear_wq(w), b) -> linear_gq -> y
        becomes
        x -> native_linear(x, w, b, linear_aq, linear_wq, linear_gq, site=linear_native) -> y

    The quantizer modules stay where they are (state_dict, set_stage, export unchanged); the call
    reads them through get_attr nodes that keep the quantizers' names and provenance. A gated op's call
    takes its gate's one-hot choice after its quantizers. Each call gets its own NativeSite
    (``{op}_native``: the options, the record of its last call). Every other compute op gets a
    NativeInfo saying why it stays simulated. Runs last in the pipeline, with the model's NativeOptions.
    """

    name = "lower-native"

    def __init__(self, options: NativeOptions = NativeOptions()):
        self.options = options

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        units.preload()  # the CPU kernels loaded (built on first use) here: torch.compile cannot trace the loader
        breaks.install()  # and what Dynamo runs where a call breaks its graph
        lowered = kept = 0
        for node in list(gm.graph.nodes):
            info, spec = meta.op_info(node), meta.qspec(node)
            if info is None or spec is None or node.target in calls.CALLS:
                continue
            why = self._why_not(node, spec)
            if why is None:
                self._lower(gm, node)
                lowered += 1
            else:
                node.meta[NATIVE] = NativeInfo(False, why)
                kept += 1
        restored = self._outputs_like_input(gm.graph) if self.options.channels_last else 0
        stats = {"lowered": lowered, "simulated": kept}
        if restored:
            stats["outputs_restored"] = restored  # layout.like_input at the graph's outputs
        return PassResult(gm, modified=lowered > 0 or restored > 0, stats=stats)

    @staticmethod
    def _outputs_like_input(graph: torch.fx.Graph) -> int:
        """With NativeOptions.channels_last, a graph with a native 2-D convolution gives its outputs back in
        its first input's layout (layout.like_input at each output, once); returns how many it put."""
        if not any(n.op == "call_function" and n.target is calls.bf16_conv2d for n in graph.nodes):
            return 0
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        first = next((n for n in graph.nodes if n.op == "placeholder"), None)
        if first is None or any(n.target is layout.like_input for n in out.all_input_nodes):
            return 0
        put = []

        def restore(value: torch.fx.Node) -> torch.fx.Node:
            if value.op == "placeholder":
                return value
            new = graph.call_function(layout.like_input, (value, first))
            new.meta.update({k: v for k, v in value.meta.items() if k in ("val", "tensor_meta")})
            put.append(new)
            return new

        with graph.inserting_before(out):
            out.args = torch.fx.node.map_arg(out.args, restore)
        return len(put)

    def _why_not(self, node: torch.fx.Node, spec) -> Optional[str]:
        if spec.excluded:
            return f"excluded: {spec.excluded}"
        if not any(spec.quantizes(role) for role in ("w", "a", "g")):
            return "full precision at every stage (the plan quantizes none of its operands or gradients)"
        is_linear = node.op == "call_function" and node.target in _LINEAR
        is_matmul = (node.op == "call_function" and node.target in _MATMUL) or (
            node.op == "call_method" and node.target in _MATMUL_METHODS)
        is_conv = _conv_fn(node) is not None
        if not (is_linear or is_matmul or is_conv):
            kind = meta.op_info(node).kind
            if kind == "sdpa":  # the plan quantizes q, k and v; P = softmax(q k^T) and dS stay float32
                return ("sdpa: only its inputs are quantized, its inner products also take the float32 attention "
                        "probabilities P = softmax(q k^T) and their gradient, which have no exact bfloat16 or int8 "
                        "codes; attention written as two matmuls quantizes P and runs both products on bf16")
            return f"no native path for {kind} yet (linear, matmul, bmm and convolutions have one)"
        kinds = self.options.kinds
        if is_conv and _conv_fn(node) in _CONV_TRANSPOSE:
            if "conv_transpose" not in kinds:
                return CONV_TRANSPOSE_SIMULATED
        elif is_conv and "conv" not in kinds and not (node.target in _CONV2D and "conv2d_int8" in kinds):
            return f"convolutions are not lowered (NativeOptions(kinds={kinds}))"
        if node.kwargs or len(node.args) < 2:
            return "operands passed by keyword"
        gated = ("gated unit (per-sample scales): gated ops run native as convolutions, linear layers and batched "
                 "products (bf16) only")
        gates, static = set(), 0  # a gated op's activation and gradient quantizers all read one gate
        for arg in node.args[:2]:
            q = next((r for r in ("act", "weight") if is_quantizer_of(arg, node, r)), None)
            if q is not None and len(arg.users) != 1:
                return "a quantized operand has other users"
            if q == "act" and len(arg.args) == 2:
                gates.add(arg.args[1])
            elif q is not None and len(arg.args) != 1:
                return gated
            else:
                static += q == "act"
        grads = [u for u in node.users if is_quantizer_of(u, node, "grad")]
        if grads and len(node.users) != 1:
            return "its output has users besides its gradient quantizer"
        if grads and len(grads[0].args) == 2:
            gates.add(grads[0].args[1])
        elif grads and len(grads[0].args) != 1:
            return gated
        else:
            static += len(grads)
        if gates and (static or len(gates) > 1):
            return "its quantizers mix gated and static ones (or read different gates)"
        return None

    def _lower(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        graph = gm.graph
        grad = next(iter(node.users)) if len(node.users) == 1 else None
        grad = grad if is_quantizer_of(grad, node, "grad") else None
        operands, refs, erase = [], [], []
        # a gated op's one-hot choice (the second argument of its gated quantizers)
        gate = next((q.args[1] for q in (*node.args[:2], grad) if isinstance(q, torch.fx.Node) and len(q.args) == 2
                     and meta.inserted(q) is not None and meta.inserted(q).source == node.name), None)
        with graph.inserting_before(node):
            for arg in node.args[:2]:
                role = "act" if is_quantizer_of(arg, node, "act") else (
                    "weight" if is_quantizer_of(arg, node, "weight") else None)
                if role is None:
                    operands.append(arg)
                    refs.append(None)
                    continue
                operands.append(arg.args[0])
                refs.append(self._ref(graph, arg, role, node))
                erase.append(arg)
            gref = self._ref(graph, grad, "grad", node) if grad is not None else None
            site = {"site": self._site(gm, node)}
            gated = (gate,) if gate is not None else ()
            if node.target in _LINEAR:
                bias = node.args[2] if len(node.args) > 2 else None
                new = graph.call_function(calls.native_linear, (operands[0], operands[1], bias, refs[0], refs[1], gref)
                                          + gated, site)
            elif node.target in _CONV2D and "conv2d_int8" in self.options.kinds and gate is None:
                # bias, stride, padding, dilation, groups with F.conv2d's defaults
                rest = list(node.args[2:]) + [None, 1, 0, 1, 1][len(node.args) - 2:]
                new = graph.call_function(calls.native_conv2d, (operands[0], operands[1], *rest, refs[0], refs[1], gref),
                                          site)
            elif _conv_fn(node) is not None:
                rule = calls.BF16_CONVS[_conv_fn(node)]
                # F's own defaults for the arguments the call left out: bias, stride, padding, ...
                defaults = [None, 1, 0, 1, 1] if rule.first_q == 7 else [None, 1, 0, 0, 1, 1]
                rest = list(node.args[2:]) + defaults[len(node.args) - 2:]
                new = graph.call_function(rule.fn, (operands[0], operands[1], *rest, refs[0], refs[1], gref) + gated,
                                          site)
            else:
                new = graph.call_function(calls.native_matmul, (operands[0], operands[1], refs[0], refs[1], gref)
                                          + gated, site)
        new.meta.update(node.meta)
        new.meta[NATIVE] = NativeInfo(True)
        (grad if grad is not None else node).replace_all_uses_with(new)
        names = {}
        for old in ([grad] if grad is not None else []) + [node] + erase:
            names[old.target if old.op == "call_module" else None] = old.name
            graph.erase_node(old)
        new.name = node.name
        for ref in [r for r in refs + [gref] if r is not None]:
            ref.name = names.get(ref.target, ref.name)

    def _site(self, gm: torch.fx.GraphModule, op: torch.fx.Node) -> torch.fx.Node:
        """A get_attr node for a new NativeSite ``{op}_native`` (the call's options and last-call record)."""
        name = f"{op.name}_native"
        while hasattr(gm, name) and not isinstance(getattr(gm, name), NativeSite):
            name += "_"
        gm.add_module(name, NativeSite(self.options))  # a re-capture's lowering replaces the previous one's
        return gm.graph.get_attr(name)

    @staticmethod
    def _ref(graph: torch.fx.Graph, quantizer: torch.fx.Node, role: str, op: torch.fx.Node) -> torch.fx.Node:
        ref = graph.get_attr(quantizer.target)
        for key in ("nn_module_stack", "stack_trace"):
            if key in quantizer.meta:
                ref.meta[key] = quantizer.meta[key]
        meta.set_inserted(ref, meta.Inserted(role=role, source=op.name, created_by=LowerNativePass.name))
        return ref


_LINEAR = {F.linear, torch.ops.aten.linear.default}
_MATMUL = {torch.matmul, operator.matmul, torch.ops.aten.matmul.default, torch.mm, torch.ops.aten.mm.default,
           torch.bmm, torch.ops.aten.bmm.default}  # on valid operands, mm and bmm compute what matmul does
_MATMUL_METHODS = {"matmul", "__matmul__", "mm", "bmm"}
_CONV2D = {F.conv2d, torch.ops.aten.conv2d.default}
_CONV_TRANSPOSE = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_CONV_BY_ATEN = {torch.ops.aten.conv1d.default: F.conv1d, torch.ops.aten.conv2d.default: F.conv2d,
                 torch.ops.aten.conv3d.default: F.conv3d, torch.ops.aten.conv_transpose1d.default: F.conv_transpose1d,
                 torch.ops.aten.conv_transpose2d.input: F.conv_transpose2d,
                 torch.ops.aten.conv_transpose3d.input: F.conv_transpose3d}


def _conv_fn(node: torch.fx.Node):
    """The F.conv* function a call_function node computes (aten overloads from torch.export included), else None."""
    if node.op != "call_function":
        return None
    fn = _CONV_BY_ATEN.get(node.target, node.target)
    return fn if fn in calls.BF16_CONVS else None
