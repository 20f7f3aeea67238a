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

    The fused call computes what the unfused ops compute, bit for bit, on every route (a convolution
    the bits or sizes leave simulated runs the BatchNorm, add and ReLU modules themselves). Each node
    between the convolution and the end of the chain must have that one user, and the add no fracpass
    annotation (a gated block's merge add stays). Then each fused call whose output only a 2-D convolution
    call reads, once, gets ``sole_reader=True`` (_GradSink: that convolution's input-gradient product comes
    to the fused call's backward unscaled). Run after LowerNativePass."""

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
        sole = 0
        for node in gm.graph.nodes:
            rule = calls.CALLS.get(node.target) if node.op == "call_function" else None
            if rule is not None and rule.is_fused and "sole_reader" not in node.kwargs and _read_once(node):
                node.kwargs = {**node.kwargs, "sole_reader": True}
                sole += 1
        return PassResult(gm, modified=fused + sole > 0, stats={"fused": fused, "sole_reader": sole})

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
