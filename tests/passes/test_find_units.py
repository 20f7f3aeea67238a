"""find-gated-units (passes/find_units.py): which compute ops one DFQ gate decision covers. An annotation pass:
Unit on each unit's merge node, the unit's name on each gated op, the gates' bits in the gated ops' QSpecs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from fracpass import meta
from fracpass.passes import AnnotatePass, FindGatedUnitsPass
from fracpass.pipeline import default_pipeline
from fracpass.plan import QSpec

from ._pipeline import Toy, gated_plan, ops, prepared, split


class Down(nn.Module):
    """A residual block whose shortcut is a 1x1 convolution, then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x))) + self.down(x)
        return self.fc(F.relu(out).mean((2, 3)))


X = torch.randn(4, 4, 6, 6)


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def _units(gm):
    return [(n.name, meta.unit(n)) for n in gm.graph.nodes if meta.unit(n) is not None]


def test_runs_right_after_annotate_and_only_for_plans_with_gates():
    assert [type(p) for p in split(gated_plan(), FindGatedUnitsPass, (X,))[0]] == [AnnotatePass]
    with pytest.raises(LookupError):
        split(fracpass.Plan.static(), FindGatedUnitsPass)


def test_each_residual_block_is_a_unit_on_its_add_and_the_graph_is_unchanged():
    model = Toy()
    gm, p = prepared(model, gated_plan(), FindGatedUnitsPass, (X,))
    sequence, code = ops(gm), gm.code
    p(gm)
    assert ops(gm) == sequence and gm.code == code and torch.equal(gm(X), model(X))
    assert _units(gm) == [
        ("add", meta.Unit("b1", 0, "x", ("b1_conv1", "b1_conv2"), main_arg=0)),
        ("add_1", meta.Unit("b2", 1, "relu_1", ("b2_conv1", "b2_conv2"), main_arg=0))]
    nodes = _nodes(gm)
    assert [meta.gated(nodes[n]) for n in ("b1_conv1", "b1_conv2", "b2_conv1", "b2_conv2", "fc")] == \
        ["b1", "b1", "b2", "b2", None]


def test_gated_ops_take_the_gates_bits_and_the_rest_keep_the_plans():
    plan = gated_plan(stages=2, a=(0, 3, 4, 6), g=(0, 6, 8, 10), w=5)
    gm, p = prepared(Toy(), plan, FindGatedUnitsPass, (X,))
    p(gm)
    nodes = _nodes(gm)
    # weights at the gates' w, activations and gradients at the widest option (a = 0 skips: its g does not count)
    assert meta.qspec(nodes["b1_conv1"]) == QSpec(w=(5, 5), a=(6, 6), g=(10, 10))
    assert meta.qspec(nodes["fc"]) == QSpec(w=(8, 8), a=(8, 8), g=(8, 8))


def test_a_shortcut_conv_runs_at_full_precision_unless_a_rule_sets_its_bits():
    gm, p = prepared(Down(), gated_plan(), FindGatedUnitsPass, (X,))
    result = p(gm)
    nodes = _nodes(gm)
    assert _units(gm) == [("add", meta.Unit("unit0", 0, "x", ("conv1", "conv2"), main_arg=0))]
    assert meta.gated(nodes["down"]) is None and meta.qspec(nodes["down"]) == QSpec(w=(32,), a=(32,), g=(32,))
    assert result.stats["shortcut_ops_full_precision"] == 1
    pinned = fracpass.Plan(stages=(fracpass.Stage(8, 8, 8),), rules=(fracpass.Rule(match="down", w=6),),
                           gates=fracpass.Gates())
    gm, p = prepared(Down(), pinned, FindGatedUnitsPass, (X,))
    assert p(gm).stats["shortcut_ops_full_precision"] == 0
    assert meta.qspec(_nodes(gm)["down"]) == QSpec(w=(6,), a=(8,), g=(8,), rules=(0,))


def test_op_granularity_gates_each_op_but_those_a_rule_pins():
    plan = fracpass.Plan(stages=(fracpass.Stage(8, 8, 8),), rules=(fracpass.Rule(match="fc", w=8),)).with_gates(
        fracpass.Gates(granularity="op"))
    gm, p = prepared(Toy(), plan, FindGatedUnitsPass, (X,))
    result = p(gm)
    assert [(anchor, u.name, u.input, u.ops) for anchor, u in _units(gm)] == [
        ("b1_conv1", "b1_conv1", "x", ("b1_conv1",)), ("b1_conv2", "b1_conv2", "relu", ("b1_conv2",)),
        ("b2_conv1", "b2_conv1", "relu_1", ("b2_conv1",)), ("b2_conv2", "b2_conv2", "relu_2", ("b2_conv2",))]
    assert meta.gated(_nodes(gm)["fc"]) is None
    assert result.stats == {"units": 4, "gated_ops": 4, "ungated_attention_units": (), "shortcut_ops_full_precision": 0}


def test_contract_stats_modified_and_idempotence_also_after_the_gates_are_in():
    plan = gated_plan()
    gm, p = prepared(Toy(), plan, FindGatedUnitsPass, (X,))
    first = p(gm)
    assert first.modified
    assert first.stats == {"units": 2, "gated_ops": 4, "ungated_attention_units": (), "shortcut_ops_full_precision": 0}
    again = FindGatedUnitsPass(plan)(gm)
    assert not again.modified and again.stats == first.stats
    gm.graph.lint()
    # the gate branches chain every unit through the LSTM state: they are not data flow, the same units come out
    default_pipeline(plan, (X,))(gm)
    units = _units(gm)
    after = FindGatedUnitsPass(plan)(gm)
    assert not after.modified and after.stats == first.stats and _units(gm) == units


def test_block_granularity_without_a_residual_block_is_a_plan_error():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    gm, p = prepared(model, gated_plan(), FindGatedUnitsPass, (X,))
    with pytest.raises(fracpass.PlanError, match=r"Gates\(granularity='block'\) found no residual block \(an add of a "
                                                 r"branch of compute ops and a shortcut from the same input\) in "
                                                 r"Sequential; use Gates\(granularity='op'\)"):
        p(gm)


def test_op_granularity_with_every_op_excluded_is_a_plan_error():
    plan = fracpass.Plan.static(8, 8, 8, exclude=("*",)).with_gates(fracpass.Gates(granularity="op"))
    gm, p = prepared(Toy(), plan, FindGatedUnitsPass, (X,))
    with pytest.raises(fracpass.PlanError, match=r"Gates\(granularity='op'\) found no quantized compute op on the "
                                                 r"model's data path in Toy; check the plan's exclude rules"):
        p(gm)
