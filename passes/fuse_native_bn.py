"""fuse-native-bn: a bf16 convolution with the BatchNorm (residual add, ReLU) after it as one native call."""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fracpass.native import calls
from fracpass.pass_base import PassBase, PassResult
from fracpass.quant import Quantizer


_ADDS = {operator.add, operator.iadd, torch.add}


_RELUS = {F.relu, torch.relu, torch.relu_}


def _only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _plain(node: torch.fx.Node) -> bool:
    """No fracpass annotation (a gated unit's merge add keeps its node)."""
    return not any(str(k).startswith("fracpass") for k in node.meta)


def _runs_before(node: torch.fx.Node, other: torch.fx.Node) -> bool:
    """``node`` comes before ``other`` in graph order."""
    n = node.next
    while n.op != "root":
        if n is other:
            return True
        n = n.next
    return False


def _only_calls(first: torch.fx.Node, last: torch.fx.Node, chain) -> bool:
    """No computation other than ``chain``'s between ``first`` and ``last`` in graph order, so that the fused
    op's autograd node takes the unfused nodes' place in the backward order (the gradient quantizers draw
    their noise in that order)."""
    n = first.next
    while n is not last:
        if n.op in ("call_function", "call_method", "call_module") and n not in chain:
            return False
        n = n.next
    return True


class FuseNativeBNPass(PassBase):
    """Fuse each bf16 convolution with the BatchNorm module it feeds, and the ReLU (and the residual add
    before it) after that, into one call that keeps less for backward (conv_bn.Bf16ConvBN)::

        x -> bf16_conv2d(x, w, ..., aq, wq, gq) -> bn -> [+ residual] -> relu -> y
        becomes
        x -> bf16_conv2d_bn(x, w, ..., aq, wq, gq, gate, bn, relu, residual, bn_first) -> y
        (then, wired to a convolution that reads y: (y, h) = bf16_conv2d_bn(..., give=...); conv(y, ..., handed=h))

    The fused call computes what the unfused ops compute, bit for bit, on every route (a convolution
    the bits or sizes leave simulated runs the BatchNorm, add and ReLU modules themselves). Each node
    between the convolution and the end of the chain must have that one user, and the add no fracpass
    annotation (a gated block's merge add stays).

    Then each fused call whose output convolution calls read as their input is wired to them: it returns
    (out, Handover) (``give=``), the graph takes the two apart with getitem, and each such reader gets
    ``handed=`` the Handover (conv_bn.Handover: out's range from the pass that wrote out, which the
    reader's activation quantizer takes instead of scanning out; handed only where nothing in the graph
    can write out in place). ``give=True`` where out's only reader is a 2-D convolution call that reads
    it once: that reader's int8 input-gradient product then comes to the fused call's backward unscaled,
    as the gradients of the Handover's placeholders. Run after LowerNativePass."""

    name = "fuse-native-bn"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        fused = 0
        for conv in list(gm.graph.nodes):
            rule = calls.CALLS.get(conv.target) if conv.op == "call_function" else None
            if rule is None or rule.fused_form is None or set(conv.kwargs) - {"site"}:
                continue
            chain = self._chain(gm, conv)
            if chain is None:
                continue
            bn, add, residual, bn_first, relu = chain
            graph, last = gm.graph, relu or add or bn
            args = list(conv.args) + [None] * (11 - len(conv.args))  # the gate slot, None for a static op
            with graph.inserting_before(last):
                bn_ref = graph.get_attr(bn.target)
                act = None if relu is None else (graph.get_attr(relu.target) if relu.op == "call_module" else "relu")
                new = graph.call_function(rule.fused_form, tuple(args) + (bn_ref, act, residual, bn_first),
                                          dict(conv.kwargs))
            new.meta.update(conv.meta)
            last.replace_all_uses_with(new)
            names = [n.name if n is not None else None for n in (conv, bn, relu)]
            for old in (relu, add, bn, conv):
                if old is not None:
                    graph.erase_node(old)
            new.name, bn_ref.name = names[:2]
            if relu is not None and relu.op == "call_module":
                act.name = names[2]
            fused += 1
        wired = sole = 0
        for node in list(gm.graph.nodes):
            rule = calls.CALLS.get(node.target) if node.op == "call_function" else None
            if rule is None or not rule.is_fused or "give" in node.kwargs:
                continue
            readers = [u for u in node.users if u.op == "call_function" and u.args and u.args[0] is node
                       and calls.CALLS.get(u.target) is not None and calls.CALLS[u.target].handed]
            if not readers or not _never_written(gm, node):
                continue
            give = _read_once(node)
            _wire(gm.graph, node, readers, give)
            wired, sole = wired + 1, sole + give
        return PassResult(gm, modified=fused + wired > 0, stats={"fused": fused, "handover": wired, "sole_reader": sole})

    @staticmethod
    def _chain(gm, conv: torch.fx.Node):
        """(bn, add, residual, bn_first, relu) after ``conv``, or None."""
        bn = _only_user(conv)
        if (bn is None or bn.op != "call_module" or bn.args != (conv,) or bn.kwargs or not _plain(bn)
                or not isinstance(gm.get_submodule(bn.target), nn.modules.batchnorm._BatchNorm)):
            return None
        add = residual = relu = None
        bn_first = True
        nxt = _only_user(bn)
        if (nxt is not None and nxt.op == "call_function" and nxt.target in _ADDS and len(nxt.args) == 2
                and not nxt.kwargs and _plain(nxt)):
            other = nxt.args[1] if nxt.args[0] is bn else nxt.args[0]
            if isinstance(other, torch.fx.Node) and other is not bn:
                add, residual, bn_first = nxt, other, nxt.args[0] is bn
                nxt = _only_user(add)
        if nxt is not None and _plain(nxt) and (
                (nxt.op == "call_module" and type(gm.get_submodule(nxt.target)) is nn.ReLU and len(nxt.args) == 1)
                or (nxt.op == "call_function" and nxt.target in _RELUS and len(nxt.args) == 1
                    and set(nxt.kwargs) <= {"inplace"})
                or (nxt.op == "call_method" and nxt.target in ("relu", "relu_") and len(nxt.args) == 1
                    and not nxt.kwargs)):
            relu = nxt
        if add is not None and (relu is None or not _runs_before(residual, conv)):
            # an add without a ReLU after it stays in the graph, and so does one whose residual is computed
            # after the convolution (a downsample branch): fused, the convolution's backward would run
            # before that branch's, which would draw the gradient quantizers' noise in another order (the
            # BatchNorm's one user is that add, so it fuses alone)
            add = residual = relu = None
            bn_first = True
        chain = {bn, add, relu} - {None}
        if not _only_calls(conv, relu or add or bn, chain):
            return None
        return bn, add, residual, bn_first, relu


def _wire(graph: torch.fx.Graph, node: torch.fx.Node, readers, give: bool) -> None:
    """``node`` (a fused call) returns (out, Handover): getitem 0 takes its place for every user, getitem 1
    goes to each of ``readers`` as ``handed``."""
    node.kwargs = {**node.kwargs, "give": give}
    with graph.inserting_after(node):
        handover = graph.call_function(operator.getitem, (node, 1))
    with graph.inserting_after(node):
        out = graph.call_function(operator.getitem, (node, 0))
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in (out, handover))
    out.name, handover.name = f"{node.name}_out", f"{node.name}_handover"
    for key in ("tensor_meta", "val"):
        if key in node.meta:
            out.meta[key] = node.meta[key]
    for reader in readers:
        reader.kwargs = {**reader.kwargs, "handed": handover}


# readers that make a new tensor from their inputs, never writing them (a handed range then holds for
# every reader)
_NEW_TENSOR_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                         torch.mul, torch.cat, torch.stack, torch.mean, F.adaptive_avg_pool1d,
                         F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                         F.max_pool1d, F.max_pool2d, F.max_pool3d}
_NEW_TENSOR_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d,
                       nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_PASS_THROUGH_MODULES = (Quantizer, nn.Identity)  # may return their input itself: their readers are checked too


def _never_written(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Nothing in the graph can write ``node``'s value in place: every reader is a native call (they never
    write their inputs), the graph's output, an op known to make a new tensor, or a module that may return
    its input itself (a quantizer at full precision, an Identity) whose readers pass the same test.
    Conservative: any other reader (an in-place op, a view, a user's module) keeps the range from being
    handed over, and the reader scans out itself."""
    for user in node.users:
        if user.op == "output" or (user.op == "call_function" and user.target in calls.CALLS):
            continue
        if (user.op == "call_function" and user.target in _NEW_TENSOR_FUNCTIONS
                and not {"out", "inplace"} & set(user.kwargs)):
            continue
        if user.op == "call_module":
            module = gm.get_submodule(user.target)
            if isinstance(module, _NEW_TENSOR_MODULES):
                continue
            if isinstance(module, _PASS_THROUGH_MODULES) and _never_written(gm, user):
                continue
        return False
    return True


def _read_once(node: torch.fx.Node) -> bool:
    """``node``'s output has one reader, a 2-D convolution call that takes it as its input and reads it once:
    autograd then hands ``node``'s backward exactly that call's input gradient."""
    reader = _only_user(node)
    rule = calls.CALLS.get(reader.target) if reader is not None and reader.op == "call_function" else None
    if rule is None or not rule.sole_reader or not reader.args \
            or reader.args[0] is not node:
        return False
    reads = []
    torch.fx.map_arg((reader.args, reader.kwargs), lambda a: reads.append(a) if a is node else None)
    return len(reads) == 1
