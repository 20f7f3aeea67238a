"""insert-weight-quant (passes/insert_weight_quant.py): module calls lowered to their functional form, a weight
quantizer (per output channel, or per tensor by a rule) on every weight operand."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from fracpass import meta, registry
from fracpass.passes import AnnotatePass, InsertWeightQuantPass
from fracpass.quant import WeightQuant

from ._pipeline import created_by, fake_quant, ops, prepared, split


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2, bias=False)
        self.fc = nn.Linear(2, 5)
        self.proj = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        h = self.up(torch.relu(self.conv(x))).mean((2, 3))
        return F.linear(self.fc(h), self.proj)


X = torch.randn(2, 3, 5, 5)
IDENTITY_THEN_4 = fracpass.Plan(stages=(fracpass.Stage(32, 32, 32), fracpass.Stage(4, 8, 8)))


def _prepared(plan=IDENTITY_THEN_4, model=None):
    return prepared(model or Net(), plan, InsertWeightQuantPass, (X,))


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def _stage(gm, k):
    for m in gm.modules():
        if isinstance(m, WeightQuant):
            m.set_stage(k)


def test_runs_after_annotate_only():
    before, _ = split(IDENTITY_THEN_4, InsertWeightQuantPass)
    assert [type(p) for p in before] == [AnnotatePass]


def test_module_calls_are_lowered_with_a_quantizer_on_each_weight():
    gm, p = _prepared()
    p(gm)
    assert ops(gm) == [
        ("get_attr", "conv.weight", "conv_weight"), ("get_attr", "conv.bias", "conv_bias"),
        ("call_module", "conv_wq", "conv_wq"), ("call_function", "conv2d", "conv"),
        ("call_function", "relu", "relu"),
        ("get_attr", "up.weight", "up_weight"), ("call_module", "up_wq", "up_wq"),
        ("call_function", "conv_transpose2d", "up"),
        ("call_method", "mean", "mean"),
        ("get_attr", "fc.weight", "fc_weight"), ("get_attr", "fc.bias", "fc_bias"), ("call_module", "fc_wq", "fc_wq"),
        ("call_function", "linear", "fc"),
        ("get_attr", "proj", "proj"), ("call_module", "linear_wq", "linear_wq"), ("call_function", "linear", "linear"),
    ]
    nodes = _nodes(gm)
    assert nodes["conv"].target is F.conv2d and nodes["conv"].args[1] is nodes["conv_wq"]
    assert nodes["conv"].args[3:] == ((1, 1), (1, 1), (1, 1), 1)  # the module's stride, padding, dilation, groups
    assert nodes["conv_wq"].args == (nodes["conv_weight"],) and nodes["conv"].args[2] is nodes["conv_bias"]
    assert nodes["linear"].args[1] is nodes["linear_wq"]  # a functional call keeps its node, its weight quantized
    assert nodes["conv"].meta[meta.MODULE_PATH] == "conv" and meta.MODULE_PATH not in nodes["linear"].meta
    # the output-channel axis: 0 for conv and linear weights, 1 for a transposed convolution's (in, out, k, k)
    assert {n: gm.get_submodule(f"{n}_wq").axis for n in ("conv", "up", "fc", "linear")} == \
        {"conv": 0, "up": 1, "fc": 0, "linear": 0}
    assert gm.get_submodule("conv_wq").stage_bits.tolist() == [32, 4]


def test_a_tensor_weight_scale_rule_gives_one_scale_per_weight():
    plan = fracpass.Plan.static(4, 8, 8, rules=[fracpass.Rule(match="fc", weight_scale="tensor")])
    gm, p = _prepared(plan)
    p(gm)
    assert gm.get_submodule("fc_wq").axis is None and gm.get_submodule("conv_wq").axis == 0


def test_excluded_and_weightless_ops_keep_their_nodes():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.fc = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(self.stem(x))
            return torch.matmul(h, h.t())  # two activations: no weight to quantize

    gm, p = prepared(Mixed(), fracpass.Plan.static(4, 4, 8, exclude=("stem",)), InsertWeightQuantPass, (torch.randn(3, 4),))
    result = p(gm)
    assert result.stats == {"weight_quant_inserted": 1, "modules_lowered": 1}
    nodes = _nodes(gm)
    assert nodes["stem"].op == "call_module" and nodes["fc"].op == "call_function"
    assert nodes["matmul"].args == (nodes["fc"], nodes["t"])


def test_stage_at_32_bits_is_bit_identical_and_low_bits_match_a_hand_written_reference():
    model = Net()
    gm, p = _prepared(model=model)
    p(gm)
    x = torch.randn(3, 3, 5, 5, requires_grad=True)
    out = gm(x)
    ref = model(x)
    assert torch.equal(out, ref)  # lowering is bit for bit the module call; the quantizers at 32 bits, identity
    grads = torch.autograd.grad(out.square().sum(), [x, *gm.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    _stage(gm, 1)
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        quantized.conv.weight.copy_(fake_quant(model.conv.weight, 4, (1, 2, 3)))
        quantized.up.weight.copy_(fake_quant(model.up.weight, 4, (0, 2, 3)))
        quantized.fc.weight.copy_(fake_quant(model.fc.weight, 4, (1,)))
        quantized.proj.copy_(fake_quant(model.proj, 4, (1,)))
    assert not torch.equal(quantized.conv.weight, model.conv.weight)
    assert torch.equal(gm(x), quantized(x))


def test_contract_stats_metadata_idempotence():
    gm, p = _prepared()
    result = p(gm)
    assert result.modified and result.stats == {"weight_quant_inserted": 4, "modules_lowered": 3}
    gm.graph.lint()
    made = created_by(gm, "insert-weight-quant")
    assert sorted(n.name for n in made) == ["conv_wq", "fc_wq", "linear_wq", "up_wq"]
    assert all(meta.inserted(n) == meta.Inserted("weight", n.name[:-3], "insert-weight-quant") for n in made)
    lowered = [n for n in gm.graph.nodes if meta.op_info(n) is not None]
    # a lowered op carries the OpInfo of its functional form and keeps its QSpec
    assert all(not meta.op_info(n).module_weight and meta.qspec(n).w == (32, 4) for n in lowered)
    code, modules = gm.code, len(list(gm.modules()))
    again = InsertWeightQuantPass()(gm)
    assert not again.modified and again.stats == {"weight_quant_inserted": 0, "modules_lowered": 0}
    assert gm.code == code and len(list(gm.modules())) == modules


def test_a_plan_that_quantizes_no_weight_changes_nothing():
    model = Net()
    gm, p = _prepared(fracpass.Plan.static(32, 4, 8), model)
    code = gm.code
    result = p(gm)
    assert not result.modified and result.stats == {"weight_quant_inserted": 0, "modules_lowered": 0}
    assert gm.code == code and torch.equal(gm(X), model(X))


def test_a_module_kind_without_a_lowering_is_a_registry_error(monkeypatch):
    class Custom(nn.Linear):
        pass

    entry = registry.OpKind("custom_linear", (registry.Operand(0, "input", "act"),), modules=(Custom,))
    monkeypatch.setitem(registry._KINDS, "custom_linear", entry)
    monkeypatch.setitem(registry._BY_MODULE, Custom, entry)
    gm, p = prepared(nn.Sequential(Custom(3, 3)), fracpass.Plan.static(8, 8, 8), InsertWeightQuantPass,
                     (torch.randn(2, 3),), leaf_modules=[Custom])
    with pytest.raises(fracpass.RegistryError, match=r"(?s)While processing %_0 : .*call_module\[target=0\].*op kind "
                                                     r"'custom_linear' has no lowering to a functional call.*add `lower=`"):
        p(gm)


def test_a_submodule_holding_the_quantizers_name_is_a_pass_error():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc_wq = nn.Linear(4, 4), nn.Identity()

        def forward(self, x):
            return self.fc_wq(self.fc(x))

    gm, p = prepared(Clash(), fracpass.Plan.static(8, 8, 8), InsertWeightQuantPass, (torch.randn(2, 4),))
    with pytest.raises(fracpass.PassError, match=r"already has a submodule 'fc_wq' \(Identity\) that is not this op's "
                                                 r"WeightQuant\(\{'stage_bits': \[8\]\}\); rename that submodule"):
        p(gm)
