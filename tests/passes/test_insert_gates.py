"""insert-gates (passes/insert_gates.py): a gate branch per gated unit, chained through the shared LSTM state, and a
skip multiplier on a residual branch when an option skips the block."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from fracpass import meta
from fracpass.gating import GateHub, skip_gate
from fracpass.passes import AnnotatePass, FindGatedUnitsPass, InsertGatesPass, InsertWeightQuantPass

from ._pipeline import Toy, created_by, fake_quant, gated_plan, ops, prepared, split

X = torch.randn(4, 4, 6, 6)
OP_GATES = fracpass.Plan(stages=(fracpass.Stage(8, 8, 8),)).with_gates(fracpass.Gates(granularity="op"))


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def _pick(hub: GateHub, option: int) -> None:
    """Make every gate choose ``option`` for every sample."""
    with torch.no_grad():
        hub.proj.weight.zero_()
        hub.proj.bias.fill_(-100.0)
        hub.proj.bias[option] = 100.0


def test_runs_after_the_units_are_found_and_the_weights_quantized():
    assert [type(p) for p in split(gated_plan(), InsertGatesPass, (X,))[0]] == \
        [AnnotatePass, FindGatedUnitsPass, InsertWeightQuantPass]


def test_each_unit_gets_a_gate_after_its_input_chained_through_the_lstm_state():
    gm, p = prepared(Toy(), gated_plan(), InsertGatesPass, (X,))
    p(gm)
    nodes = _nodes(gm)
    gate_ops = [o for o in ops(gm) if o[2].startswith("gate_")]
    assert gate_ops == [("call_module", "gates", "gate_b1"), ("call_function", "getitem", "gate_b1_choice"),
                        ("call_function", "getitem", "gate_b1_state"), ("call_module", "gates", "gate_b2"),
                        ("call_function", "getitem", "gate_b2_choice"), ("call_function", "getitem", "gate_b2_state")]
    assert nodes["gate_b1"].args == (nodes["x"], None, 0) and nodes["x"].next is nodes["gate_b1"]
    assert nodes["gate_b2"].args == (nodes["relu_1"], nodes["gate_b1_state"], 1)
    assert nodes["gate_b1_choice"].args == (nodes["gate_b1"], 0) and nodes["gate_b1_state"].target is operator.getitem
    hub = gm.get_submodule("gates")
    assert isinstance(hub, GateHub) and hub.unit_names == ["b1", "b2"]
    assert not any(n.target is skip_gate for n in gm.graph.nodes)  # no option skips a block


def test_a_skip_option_multiplies_the_residual_branch_before_the_add():
    model = Toy()
    plan = gated_plan(a=(0, 8), g=(0, 8))
    gm, p = prepared(model, plan, InsertGatesPass, (X,))
    x = torch.randn(3, 4, 6, 6)
    before = gm(x)  # the weights already quantized by insert-weight-quant
    result = p(gm)
    assert result.stats["skip_gates"] == 2
    nodes = _nodes(gm)
    assert nodes["gate_b1_skip"].target is skip_gate
    assert nodes["gate_b1_skip"].args == (nodes["b1_conv2"], nodes["gate_b1_choice"], (0,))
    assert nodes["add"].args == (nodes["gate_b1_skip"], nodes["x"])
    # numerics: a gate that keeps every sample leaves the block as it was; one that skips leaves the shortcut
    _pick(gm.gates, 1)
    assert torch.equal(gm(x), before)
    _pick(gm.gates, 0)
    fc = model.fc  # the head's weight at the stage's 8 bits, per output channel
    assert torch.equal(gm(x), F.linear(F.relu(F.relu(x)).mean((2, 3)), fake_quant(fc.weight, 8, (1,)), fc.bias))


def test_without_a_skip_option_the_outputs_stay_bit_identical():
    model = Toy()
    gm, p = prepared(model, gated_plan(), InsertGatesPass, (X,))
    x = torch.randn(3, 4, 6, 6)
    before = gm(x)
    p(gm)
    assert torch.equal(gm(x), before)  # the choices are not read until the quantizer passes wire them in


def test_contract_stats_metadata_idempotence():
    plan = gated_plan()
    gm, p = prepared(Toy(), plan, InsertGatesPass, (X,))
    result = p(gm)
    hub = gm.get_submodule("gates")
    assert result.modified and result.stats == {"gates_inserted": 2, "skip_gates": 0,
                                                "gate_parameters": sum(t.numel() for t in hub.parameters())}
    assert result.stats["gate_parameters"] > 0
    gm.graph.lint()
    made = created_by(gm, "insert-gates")
    assert len(made) == 6 and all(meta.inserted(n).role == "gate" for n in made)
    assert {meta.inserted(n).source for n in made} == {"b1", "b2"}
    code, modules = gm.code, len(list(gm.modules()))
    again = InsertGatesPass(plan, (X,), {})(gm)
    assert not again.modified and again.stats == {"gates_inserted": 0, "skip_gates": 0}
    assert gm.code == code and len(list(gm.modules())) == modules


def test_without_example_inputs_the_precondition_says_to_pass_them():
    gm, _ = prepared(Toy(), gated_plan(), InsertGatesPass, (X,))
    with pytest.raises(fracpass.PassError, match=r"insert-gates: a plan with gates needs example inputs .*pass "
                                                 r"example_inputs=\(x,\) to fracpass.transform"):
        InsertGatesPass(gated_plan(), (), {})(gm)


def test_a_unit_input_that_does_not_lead_with_the_batch_is_a_plan_error():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):  # (B, L, E) -> (L, B, E)
            return self.fc(x.transpose(0, 1))

    x = torch.randn(2, 5, 4)
    gm, p = prepared(SequenceFirst(), OP_GATES, InsertGatesPass, (x,))
    with pytest.raises(fracpass.PlanError, match=r"gated unit 'fc': its input 'transpose' has shape \(5, 2, 4\), whose "
                                                 r"first dimension is not the example batch \(2\).*Rule\(match='fc', "
                                                 r"w=8, a=8, g=8\)"):
        p(gm)


def test_a_unit_input_without_a_channel_dimension_is_a_pass_error():
    gm, p = prepared(nn.Sequential(nn.Linear(8, 4)), OP_GATES, InsertGatesPass, (torch.randn(8),))
    with pytest.raises(fracpass.PassError, match=r"the input of gated unit '0' \(input_1\) has shape \(8,\); a gate needs a "
                                                 r"batch dimension and a channel dimension"):
        p(gm)


def test_a_submodule_called_gates_that_is_not_a_gate_hub_is_a_pass_error():
    class Clash(Toy):
        def __init__(self):
            super().__init__()
            self.gates = nn.Identity()

        def forward(self, x):
            return super().forward(self.gates(x))

    gm, p = prepared(Clash(), gated_plan(), InsertGatesPass, (X,))
    with pytest.raises(fracpass.PassError, match=r"insert-gates: the model already has a submodule 'gates' \(Identity\) "
                                                 r"that is not this plan's gates"):
        p(gm)


def test_a_gate_that_cannot_precede_its_ops_is_a_pass_error(monkeypatch):
    """The lint the pass runs after wiring the gates, failing as it would on units interleaved in a way the LSTM
    order cannot follow (no small model reaches it; the raise site and its message are what this checks)."""
    gm, p = prepared(Toy(), gated_plan(), InsertGatesPass, (X,))

    def lint(graph):
        raise RuntimeError("Argument 'gate_b2_choice' of Node 'b2_conv1_aq' was used before it has been defined!")

    monkeypatch.setattr(torch.fx.Graph, "lint", lint)
    with pytest.raises(fracpass.PassError, match=r"insert-gates: a gate could not be placed before the ops it drives "
                                                 r"\(Argument 'gate_b2_choice'.*\); .*use Gates\(granularity='op'\)"):
        p(gm)
