"""insert-act-quant (passes/insert_act_quant.py): a per-tensor activation quantizer on every activation input of a
compute op that quantizes activations; in a gated unit, one that also reads the gate's choice."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fracpass
from fracpass import meta
from fracpass.gating import GatedActQuant
from fracpass.pass_base import PassResult
from fracpass.passes import (AnnotatePass, FindGatedUnitsPass, InsertActQuantPass, InsertGatesPass,
                             InsertWeightQuantPass)
from fracpass.quant import ActQuant

from ._pipeline import Toy, created_by, fake_quant, gated_plan, prepared, split


class Net(nn.Module):
    """conv -> relu, then two linears reading the same tensor and a product of two activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return torch.matmul(self.fc1(h).unsqueeze(2), self.fc2(h).unsqueeze(1))


X = torch.randn(2, 3, 5, 5)
ACT_ONLY = fracpass.Plan(stages=(fracpass.Stage(32, 32, 32), fracpass.Stage(32, 4, 32)))  # stage 1: a = 4 alone


def _prepared(plan=ACT_ONLY, model=None):
    return prepared(model or Net(), plan, InsertActQuantPass, (X,))


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def _stage(gm, k):
    for m in gm.modules():
        if isinstance(m, ActQuant):
            m.set_stage(k)


def test_runs_after_the_weight_quantizers_and_the_gates():
    assert [type(p) for p in split(ACT_ONLY, InsertActQuantPass)[0]] == [AnnotatePass, InsertWeightQuantPass]
    assert [type(p) for p in split(gated_plan(), InsertActQuantPass, (X,))[0]] == \
        [AnnotatePass, FindGatedUnitsPass, InsertWeightQuantPass, InsertGatesPass]


def test_each_activation_input_gets_its_own_quantizer_before_the_op():
    gm, p = _prepared()
    p(gm)
    nodes = _nodes(gm)
    assert nodes["conv_aq"].args == (nodes["x"],) and nodes["conv"].args[0] is nodes["conv_aq"]
    assert nodes["conv_aq"].next is nodes["conv"]  # inserted right before its op
    # fc1 and fc2 read the same tensor, each through its own quantizer (ops may differ in bits)
    assert nodes["fc1_aq"].args == (nodes["mean"],) and nodes["fc2_aq"].args == (nodes["mean"],)
    assert nodes["fc1"].args[0] is nodes["fc1_aq"] and nodes["fc2"].args[0] is nodes["fc2_aq"]
    # a product of two activations: _aq for the first operand, _aq1 for the second
    assert nodes["matmul"].args == (nodes["matmul_aq"], nodes["matmul_aq1"])
    assert nodes["matmul_aq"].args == (nodes["unsqueeze"],) and nodes["matmul_aq1"].args == (nodes["unsqueeze_1"],)
    assert all(type(gm.get_submodule(n)) is ActQuant for n in ("conv_aq", "fc1_aq", "fc2_aq", "matmul_aq", "matmul_aq1"))
    assert gm.get_submodule("conv_aq").stage_bits.tolist() == [32, 4]


def test_stage_at_32_bits_is_bit_identical_and_4_bits_match_a_hand_written_reference():
    model = Net()
    gm, p = _prepared(model=model)
    p(gm)
    x = torch.randn(3, 3, 5, 5)
    assert torch.equal(gm(x), model(x))
    _stage(gm, 1)
    h = torch.relu(model.conv(fake_quant(x, 4))).mean((2, 3))
    a, b = model.fc1(fake_quant(h, 4)).unsqueeze(2), model.fc2(fake_quant(h, 4)).unsqueeze(1)
    assert torch.equal(gm(x), torch.matmul(fake_quant(a, 4), fake_quant(b, 4)))
    # in eval, each quantizer uses its running range: that of the one training batch seen (x's)
    gm.eval()
    y = 3 * torch.randn(3, 3, 5, 5)

    def rng(t):
        return {"lo": t.min(), "hi": t.max()}

    hy = torch.relu(model.conv(fake_quant(y, 4, **rng(x)))).mean((2, 3))
    ay = model.fc1(fake_quant(hy, 4, **rng(h))).unsqueeze(2)
    by = model.fc2(fake_quant(hy, 4, **rng(h))).unsqueeze(1)
    ref = torch.matmul(fake_quant(ay, 4, **rng(a)), fake_quant(by, 4, **rng(b)))
    assert y.max() > x.max() and torch.equal(gm(y), ref)


def test_contract_stats_metadata_idempotence():
    gm, p = _prepared()
    result = p(gm)
    assert result.modified and result.stats == {"act_quant_inserted": 5, "gated": 0}
    gm.graph.lint()
    made = created_by(gm, "insert-act-quant")
    assert sorted(n.name for n in made) == ["conv_aq", "fc1_aq", "fc2_aq", "matmul_aq", "matmul_aq1"]
    assert all(meta.inserted(n).role == "act" and meta.inserted(n).source == n.name.split("_aq")[0] for n in made)
    code, modules = gm.code, len(list(gm.modules()))
    again = InsertActQuantPass(ACT_ONLY)(gm)
    assert not again.modified and again.stats == {"act_quant_inserted": 0, "gated": 0}
    assert gm.code == code and len(list(gm.modules())) == modules


def test_a_plan_that_quantizes_no_activation_changes_nothing():
    model = Net()
    gm, p = _prepared(fracpass.Plan.static(4, 32, 8, rules=[fracpass.Rule(match="fc1", a=32)]), model)
    code = gm.code
    result = p(gm)
    assert not result.modified and result.stats == {"act_quant_inserted": 0, "gated": 0} and gm.code == code
    partial = fracpass.Plan.static(32, 32, 32, rules=[fracpass.Rule(match="fc2", a=6)])
    gm, p = _prepared(partial, model)
    assert p(gm).stats == {"act_quant_inserted": 1, "gated": 0}
    assert [n.name for n in created_by(gm, "insert-act-quant")] == ["fc2_aq"]


def test_gated_ops_get_a_quantizer_reading_their_gates_choice():
    torch.manual_seed(0)
    x = torch.randn(4, 4, 6, 6)
    plan = gated_plan()
    gm, p = prepared(Toy(), plan, InsertActQuantPass, (x,))
    result = p(gm)
    assert result.stats == {"act_quant_inserted": 5, "gated": 4}  # conv1, conv2 of b1 and b2; the head ungated
    nodes = _nodes(gm)
    assert nodes["b1_conv1_aq"].args == (nodes["x"], nodes["gate_b1_choice"])
    assert nodes["b2_conv2_aq"].args[1] is nodes["gate_b2_choice"]
    assert nodes["fc_aq"].args == (nodes["mean"],)
    hub = gm.get_submodule("b1_conv1_aq")
    assert isinstance(hub, GatedActQuant) and type(gm.get_submodule("fc_aq")) is ActQuant
    assert hub.options.tolist() == list(plan.gates.a)
    assert not InsertActQuantPass(plan)(gm).modified


def test_a_gated_op_without_its_gate_branch_is_a_pass_error():
    plan = gated_plan()
    x = torch.randn(4, 4, 6, 6)
    gm, _ = prepared(Toy(), plan, InsertGatesPass, (x,))  # find-gated-units ran, insert-gates did not
    with pytest.raises(fracpass.PassError, match=r"(?s)While processing %b1_conv1 .*belongs to gated unit 'b1' but no "
                                                 r"gate branch for it is in the graph; run insert-gates before"):
        InsertActQuantPass(plan)(gm)


def test_a_submodule_holding_the_quantizers_name_is_a_pass_error():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc_aq = nn.Linear(4, 4), nn.Identity()

        def forward(self, x):
            return self.fc_aq(self.fc(x))

    gm, p = prepared(Clash(), fracpass.Plan.static(8, 8, 8), InsertActQuantPass, (torch.randn(2, 4),))
    with pytest.raises(fracpass.PassError, match=r"already has a submodule 'fc_aq' \(Identity\) that is not this op's "
                                                 r"ActQuant\(\{'stage_bits': \[8\]\}\)"):
        p(gm)


def test_an_activation_input_left_unquantized_fails_the_postcondition():
    class Skipping(InsertActQuantPass):
        def call(self, gm):
            return PassResult(gm, modified=False)

    gm, _ = _prepared()
    with pytest.raises(fracpass.PostconditionError, match=r"pass 'insert-act-quant': postcondition failed: .*%conv : "
                                                          r".* has an unquantized activation input x"):
        Skipping(ACT_ONLY)(gm)
