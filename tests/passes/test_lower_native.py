"""lower-native (passes/lower_native.py): each quantized linear / matmul / convolution group (_aq -> op -> _gq)
becomes one native call reading its quantizers through get_attr nodes; every other compute op is told why it stays
simulated. The call picks its path per call: on this CPU (or under the default size thresholds) the simulated
route, bit for bit the unlowered group."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from fracpass import meta, native
from fracpass.native import calls
from fracpass.native.site import NATIVE, NativeInfo, NativeSite
from fracpass.passes import (AnnotatePass, FuseNativeBNPass, InsertActQuantPass, InsertGradQuantPass,
                             InsertWeightQuantPass, LowerNativePass)

from ._pipeline import UNITS, created_by, prepared, split


class Net(nn.Module):
    """A conv, a linear, a product of two activations, an attention call and an excluded head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        q = self.fc(h).view(-1, 2, 4)
        s = torch.matmul(q, q.transpose(1, 2))
        a = F.scaled_dot_product_attention(s, s, s)
        return self.head(a.flatten(1).repeat(1, 2))


X = torch.randn(2, 3, 6, 6)
PLAN = fracpass.Plan.static(8, 8, 8, exclude=("head",))
OPTS = fracpass.NativeOptions(fuse_bn=False)


def _prepared(plan=PLAN, options=OPTS, model=None):
    return prepared(model or Net(), plan, LowerNativePass, (X,), native=options)


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def _step(gm, x, seed=3):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = gm(x)
    out.square().sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in gm.parameters()]


def test_runs_last_with_the_models_options_before_the_bn_fusion():
    before, p = split(PLAN, LowerNativePass, native=OPTS)
    assert [type(q) for q in before] == [AnnotatePass, InsertWeightQuantPass, InsertActQuantPass, InsertGradQuantPass]
    assert p.options is OPTS
    with_fusion = split(PLAN, FuseNativeBNPass, native=fracpass.NativeOptions())[0]
    assert type(with_fusion[-1]) is LowerNativePass
    with pytest.raises(LookupError):
        split(PLAN, LowerNativePass)  # simulate: no lowering


def test_each_quantized_group_becomes_one_native_call():
    gm, p = _prepared()
    p(gm)
    nodes = _nodes(gm)
    conv, fc, matmul = nodes["conv"], nodes["fc"], nodes["matmul"]
    assert conv.target is calls.bf16_conv2d and fc.target is calls.native_linear and matmul.target is calls.native_matmul
    # the op's operands, F.conv2d's own arguments, then the quantizers (get_attr nodes under their names)
    assert conv.args[0] is nodes["x"] and conv.args[1].target == "conv.weight" and conv.args[2].target == "conv.bias"
    assert conv.args[3:7] == ((1, 1), (1, 1), (1, 1), 1)
    assert [(a.op, a.name, a.target) for a in conv.args[7:]] == [
        ("get_attr", "conv_aq", "conv_aq"), ("get_attr", "conv_wq", "conv_wq"), ("get_attr", "conv_gq", "conv_gq")]
    assert [a.name for a in matmul.args[2:]] == ["matmul_aq", "matmul_aq1", "matmul_gq"]
    assert matmul.args[0] is nodes["view"] and matmul.args[1] is nodes["transpose"]
    site = conv.kwargs["site"]
    assert site.op == "get_attr" and site.target == "conv_native" and isinstance(gm.get_submodule("conv_native"), NativeSite)
    assert gm.get_submodule("conv_native").options is OPTS
    # no call_module of a quantizer is left for the lowered ops; their modules stay (state_dict unchanged)
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(("conv_", "fc_", "matmul_"))]
    assert {"conv_aq", "conv_wq", "conv_gq", "matmul_aq1"} <= dict(gm.named_modules()).keys()
    assert nodes["relu"].args == (conv,)  # the gradient quantizer's users now read the call


def test_ops_left_simulated_say_why():
    gm, p = _prepared(options=fracpass.NativeOptions(kinds=("linear", "matmul"), fuse_bn=False))
    p(gm)
    nodes = _nodes(gm)
    info = {n: nodes[n].meta[NATIVE] for n in ("conv", "fc", "matmul", "scaled_dot_product_attention", "head")}
    assert info["fc"] == NativeInfo(True) and info["matmul"] == NativeInfo(True)
    assert info["conv"] == NativeInfo(False, "convolutions are not lowered (NativeOptions(kinds=('linear', 'matmul')))")
    assert info["head"] == NativeInfo(False, "excluded: excluded by plan (exclude 'head')")
    assert not info["scaled_dot_product_attention"].lowered
    assert info["scaled_dot_product_attention"].reason.startswith("sdpa: only its inputs are quantized")
    assert nodes["conv"].target is F.conv2d and nodes["conv"].args[0].name == "conv_aq"  # the simulated group stays


def test_a_plan_that_quantizes_nothing_lowers_nothing_and_stays_bit_identical():
    model = Net()
    gm, p = _prepared(fracpass.Plan.static(32, 32, 32), model=model)
    code = gm.code
    result = p(gm)
    assert not result.modified and result.stats == {"lowered": 0, "simulated": 5} and gm.code == code
    assert _nodes(gm)["fc"].meta[NATIVE] == NativeInfo(
        False, "full precision at every stage (the plan quantizes none of its operands or gradients)")
    assert torch.equal(gm(X), model(X))


def test_the_lowered_model_computes_what_the_simulated_one_does_bit_for_bit():
    """The default thresholds keep products this small simulated on any CPU: the call runs the quantizer modules
    and the op, as the graph did before the pass (the gradient quantizers draw the same noise)."""
    torch.manual_seed(0)
    model = Net()
    plan = fracpass.Plan.progressive(fw=(4, 8), bw=(6, 8), exclude=("head",))
    simulated, _ = _prepared(plan, model=model)
    lowered, p = _prepared(plan, model=model)
    p(lowered)
    x = torch.randn(3, 3, 6, 6)
    for got, want in zip(_step(lowered, x), _step(simulated, x)):
        assert torch.equal(got, want)
    assert lowered.get_submodule("fc_native").last.mm is None  # no int8 product ran


def test_claimed_int8_units_take_the_native_products(monkeypatch):
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: UNITS)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    every_size = fracpass.NativeOptions(min_intensity=0.0, fuse_bn=False)
    x = torch.randn(8, 16)
    simulated, _ = prepared(model, fracpass.Plan.static(8, 8, 8), LowerNativePass, (x,), native=every_size)
    lowered, p = prepared(model, fracpass.Plan.static(8, 8, 8), LowerNativePass, (x,), native=every_size)
    assert p(lowered).stats == {"lowered": 2, "simulated": 0}
    out, want = lowered(x), simulated(x)
    # the int8 products ran: each site records its (device, M, K, N)
    assert lowered.get_submodule("_0_native").last.mm == (torch.device("cpu"), 8, 16, 16)
    assert lowered.get_submodule("_2_native").last.mm == (torch.device("cpu"), 8, 16, 4)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)  # exact codes; float32 rounding of the scaling


def test_contract_stats_metadata_idempotence():
    gm, p = _prepared()
    result = p(gm)
    # a 2-D convolution lowered: the output goes through layout.like_input (NativeOptions.channels_last), once
    assert result.modified and result.stats == {"lowered": 3, "simulated": 2, "outputs_restored": 1}
    gm.graph.lint()
    refs = created_by(gm, "lower-native")
    assert sorted((n.name, meta.inserted(n).role, meta.inserted(n).source) for n in refs) == [
        ("conv_aq", "act", "conv"), ("conv_gq", "grad", "conv"), ("conv_wq", "weight", "conv"),
        ("fc_aq", "act", "fc"), ("fc_gq", "grad", "fc"), ("fc_wq", "weight", "fc"),
        ("matmul_aq", "act", "matmul"), ("matmul_aq1", "act", "matmul"), ("matmul_gq", "grad", "matmul")]
    nodes = _nodes(gm)
    assert meta.op_info(nodes["conv"]).kind == "conv2d" and meta.qspec(nodes["conv"]).w == (8,)  # kept from the op
    code, state = gm.code, list(gm.state_dict())
    again = LowerNativePass(OPTS)(gm)
    assert not again.modified and again.stats == {"lowered": 0, "simulated": 2}
    assert gm.code == code and list(gm.state_dict()) == state
