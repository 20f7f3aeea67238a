"""fuse-native-bn (passes/fuse_native_bn.py): a bf16 convolution call with the BatchNorm it feeds (the residual add
and the ReLU after it) as one fused call; a fused call whose output convolution calls read is wired to them (it returns
(out, Handover), they take ``handed=``), with give=True where one 2-D convolution call alone reads it, once. Where the bits or sizes leave the convolution simulated, the fused call runs the BatchNorm, add and
ReLU modules themselves: bit for bit the unfused graph."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from fracpass import meta, native
from fracpass.native import calls
from fracpass.native.site import NATIVE, NativeInfo
from fracpass.passes import FuseNativeBNPass, LowerNativePass

from ._pipeline import UNITS, prepared, split


class Block(nn.Module):
    """conv1 -> bn1 -> ReLU module -> conv2 -> bn2 (+ x) -> F.relu -> linear head."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)) + x)
        return self.head(out.mean((2, 3)))


X = torch.randn(2, 4, 6, 6)
PLAN = fracpass.Plan.static(8, 8, 8)
OPTS = fracpass.NativeOptions()  # fuse_bn=True by default


def _prepared(plan=PLAN, options=OPTS, model=None):
    return prepared(model or Block(), plan, FuseNativeBNPass, (X,), native=options)


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def _fused(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in calls.CALLS
            and calls.CALLS[n.target].is_fused]


def _step(gm, x, seed=3):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = gm(x)
    out.square().sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in gm.parameters()] + [b.clone() for b in gm.buffers()]


def test_runs_after_lower_native_only_when_the_options_ask_for_it():
    before, _ = split(PLAN, FuseNativeBNPass, native=OPTS)
    assert type(before[-1]) is LowerNativePass
    with pytest.raises(LookupError):
        split(PLAN, FuseNativeBNPass, native=OPTS.replace(fuse_bn=False))


def test_conv_bn_relu_and_conv_bn_add_relu_become_one_call_each():
    gm, p = _prepared()
    p(gm)
    nodes = _nodes(gm)
    conv1, conv2 = nodes["conv1"], nodes["conv2"]
    assert conv1.target is calls.bf16_conv2d_bn and conv2.target is calls.bf16_conv2d_bn
    assert not any(n.op == "call_module" and n.target in ("bn1", "bn2", "relu1") for n in gm.graph.nodes)
    assert not any(n.op == "call_function" and n.target in (F.relu, torch.relu) for n in gm.graph.nodes)
    # conv arguments, the gate slot (None: not gated), then BatchNorm, activation, residual, bn_first
    assert conv1.args[10] is None and conv2.args[10] is None
    assert (conv1.args[11].op, conv1.args[11].name, conv1.args[11].target) == ("get_attr", "bn1", "bn1")
    assert (conv1.args[12].op, conv1.args[12].name, conv1.args[12].target) == ("get_attr", "relu1", "relu1")
    assert conv1.args[13:] == (None, True)
    assert conv2.args[11].target == "bn2" and conv2.args[12] == "relu" and conv2.args[13:] == (nodes["x"], True)
    assert [a.name for a in conv1.args[7:10]] == ["conv1_aq", "conv1_wq", "conv1_gq"]
    # conv1's fused output is read by conv2's call alone, once: conv1 returns (out, Handover), conv2 reads out
    # and takes the Handover (conv1's range, and placeholders through which conv2 may hand its input
    # gradient over unscaled)
    assert conv1.kwargs == {"site": conv1.kwargs["site"], "give": True}
    assert conv2.args[0] is nodes["conv1_out"] and nodes["conv1_out"].args == (conv1, 0)
    assert conv2.kwargs == {"site": conv2.kwargs["site"], "handed": nodes["conv1_handover"]}
    assert nodes["conv1_handover"].args == (conv1, 1) and set(conv1.users) == {nodes["conv1_out"], nodes["conv1_handover"]}
    assert nodes["mean"].args[0] is conv2


def test_fused_calls_keep_the_convolutions_metadata():
    gm, p = _prepared()
    p(gm)
    for node in _fused(gm):
        assert meta.op_info(node).kind == "conv2d" and meta.qspec(node).w == (8,)
        assert node.meta[NATIVE] == NativeInfo(True)


def test_fused_equals_unfused_bit_for_bit_where_the_convolutions_run_simulated():
    torch.manual_seed(0)
    model = Block()
    plan = fracpass.Plan.progressive(fw=(4, 8), bw=(6, 8))
    unfused, _ = _prepared(plan, model=model)
    fused, p = _prepared(plan, model=model)
    assert p(fused).stats == {"fused": 2, "handover": 1, "sole_reader": 1}
    x = torch.randn(3, 4, 6, 6)
    for _ in range(2):  # the second step reads the running statistics the first one updated
        for got, want in zip(_step(fused, x), _step(unfused, x)):
            assert torch.equal(got, want)
    fused.eval(), unfused.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), unfused(x))


def test_fused_equals_unfused_bit_for_bit_on_claimed_bf16_units(monkeypatch):
    """With the bf16 path taken (emulated here) and the fused BatchNorm on aten's kernels (fast_bn=False), the
    contract of tests/native/test_fuse_native_bn.py, which skips on CPUs without bf16 units."""
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: UNITS)
    torch.manual_seed(0)
    model = Block()
    options = fracpass.NativeOptions(min_conv_macs=0, fast_bn=False)
    unfused, _ = _prepared(model=model, options=options)
    fused, p = _prepared(model=model, options=options)
    p(fused)
    x = torch.randn(2, 4, 6, 6)
    for got, want in zip(_step(fused, x), _step(unfused, x)):
        assert torch.equal(got, want)
    assert fused.get_submodule("conv1_native").last.bn is not None  # the fused route ran its BatchNorm


def test_chains_that_cannot_fuse_keep_their_nodes():
    class Shapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c3 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            a = self.b1(self.c1(x))
            b = a + a.mean()                       # bn1's output has two users: conv + bn only
            c = F.leaky_relu(self.b2(self.c2(b)))  # not a ReLU: conv + bn only
            return torch.relu(self.c3(c))          # no BatchNorm: not fused

    gm, p = _prepared(model=Shapes())
    assert p(gm).stats == {"fused": 2, "handover": 0, "sole_reader": 0}
    nodes = _nodes(gm)
    assert {n.name for n in _fused(gm)} == {"c1", "c2"}
    assert all(n.args[12] is None and n.args[13] is None for n in _fused(gm))
    assert nodes["c3"].target is calls.bf16_conv2d and nodes["relu"].args == (nodes["c3"],)
    assert nodes["leaky_relu"].args[0] is nodes["c2"] and nodes["add"].args[0] is nodes["c1"]


def test_a_plan_that_quantizes_nothing_has_nothing_to_fuse():
    model = Block()
    gm, p = _prepared(fracpass.Plan.static(32, 32, 32), model=model)
    code = gm.code
    result = p(gm)
    assert not result.modified and result.stats == {"fused": 0, "handover": 0, "sole_reader": 0} and gm.code == code
    assert torch.equal(gm(X), model(X))


def test_contract_stats_modified_idempotence():
    gm, p = _prepared()
    result = p(gm)
    assert result.modified and result.stats == {"fused": 2, "handover": 1, "sole_reader": 1}
    gm.graph.lint()
    code, state = gm.code, list(gm.state_dict())
    again = FuseNativeBNPass()(gm)
    assert not again.modified and again.stats == {"fused": 0, "handover": 0, "sole_reader": 0}
    assert gm.code == code and list(gm.state_dict()) == state
