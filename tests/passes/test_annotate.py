"""annotate (passes/annotate.py): the registry's OpInfo and the plan's QSpec on every compute node; the graph
itself is left as it was."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from fracpass import meta
from fracpass.passes import AnnotatePass
from fracpass.plan import QSpec

from ._pipeline import captured, ops, split, transformed


class Net(nn.Module):
    """A module conv and linear, a functional linear on a parameter, and a product of two activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.proj = nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        h = self.fc(h)
        p = F.linear(h, self.proj)
        return torch.matmul(p.unsqueeze(2), p.unsqueeze(1))


X = torch.randn(2, 3, 6, 6)
LADDER = fracpass.Plan.progressive(fw=(4, 8), bw=(6, 8), rules=[fracpass.Rule(match="fc", g=16)])


def _annotate(plan, model=None):
    gm = captured(model or Net(), (X,))
    return gm, AnnotatePass(plan)(gm)


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def test_it_is_first_in_the_pipeline():
    before, p = split(LADDER, AnnotatePass)
    assert before == [] and p.plan is LADDER


def test_graph_is_unchanged_and_compute_nodes_carry_op_info():
    gm = captured(Net(), (X,))
    sequence, code = ops(gm), gm.code
    AnnotatePass(LADDER)(gm)
    assert ops(gm) == sequence and gm.code == code
    nodes = _nodes(gm)
    assert meta.op_info(nodes["conv"]) == meta.OpInfo("conv2d", "conv", act_args=((0,),), weight_args=(), weight_axes=(),
                                                      traits=meta.op_info(nodes["conv"]).traits, module_weight=True)
    assert meta.op_info(nodes["fc"]).kind == "linear" and meta.op_info(nodes["fc"]).module_weight
    linear = meta.op_info(nodes["linear"])  # F.linear on a parameter: the weight is its second argument
    assert (linear.kind, linear.act_args, linear.weight_args, linear.weight_axes) == ("linear", ((0,),), ((1,),), (0,))
    matmul = meta.op_info(nodes["matmul"])  # two activations: no weight
    assert (matmul.kind, matmul.act_args, matmul.weight_args) == ("matmul", ((0,), (1,)), ())
    annotated = sorted(n.name for n in gm.graph.nodes if meta.op_info(n) is not None)
    assert annotated == ["conv", "fc", "linear", "matmul"]
    assert all(meta.qspec(n) is None for n in gm.graph.nodes if n.name not in annotated)


def test_qspec_holds_the_stage_bits_and_the_rules_that_matched():
    gm, _ = _annotate(LADDER)
    nodes = _nodes(gm)
    assert meta.qspec(nodes["conv"]) == QSpec(w=(4, 8), a=(4, 8), g=(6, 8))
    assert meta.qspec(nodes["fc"]) == QSpec(w=(4, 8), a=(4, 8), g=(16, 16), rules=(0,))
    excluded = fracpass.Plan.static(8, 8, 8, exclude=("conv",), rules=[fracpass.Rule(kind="matmul", a=(6,))])
    gm, _ = _annotate(excluded)
    nodes = _nodes(gm)
    assert meta.qspec(nodes["conv"]).excluded == "excluded by plan (exclude 'conv')"
    assert not meta.qspec(nodes["conv"]).quantizes("w")
    assert meta.qspec(nodes["matmul"]) == QSpec(w=(8,), a=(6,), g=(8,), rules=(1,))
    tensor = fracpass.Plan.static(8, 8, 8, rules=[fracpass.Rule(match="fc", weight_scale="tensor")])
    gm, _ = _annotate(tensor)
    assert meta.qspec(_nodes(gm)["fc"]).weight_scale == "tensor" and meta.qspec(_nodes(gm)["conv"]).weight_scale == "channel"


def test_outputs_are_bit_identical_whatever_the_plan():
    """annotate only writes metadata: even a 2-bit plan leaves the computation as it was."""
    model = Net()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 6, 6)
    for plan in (fracpass.Plan.static(32, 32, 32), fracpass.Plan.static(2, 2, 2)):
        gm, _ = _annotate(plan, model)
        assert torch.equal(gm(x), model(x))


def test_contract_stats_modified_and_idempotence():
    gm, first = _annotate(LADDER)
    assert first.modified
    assert first.stats == {"compute_ops": 4, "excluded": 0, "annotated": 4, "by_kind": {"conv2d": 1, "linear": 2, "matmul": 1}}
    code = gm.code
    again = AnnotatePass(LADDER)(gm)
    assert not again.modified and again.stats["annotated"] == 0 and again.stats["compute_ops"] == 4
    assert gm.code == code
    gm.graph.lint()
    # another plan changes only the ops whose QSpec differs: conv (now excluded) and fc (its g rule gone)
    other = AnnotatePass(fracpass.Plan.progressive(fw=(4, 8), bw=(6, 8), exclude=("conv",)))(gm)
    assert other.modified and other.stats["annotated"] == 2 and other.stats["excluded"] == 1


def test_quantizer_nodes_a_later_pass_inserted_are_not_annotated():
    plan = fracpass.Plan.static(8, 8, 8)
    gm = transformed(Net(), plan, (X,))
    assert len([n for n in gm.graph.nodes if meta.inserted(n) is not None]) == 12  # aq, wq (aq1 for the matmul), gq per op
    result = AnnotatePass(plan)(gm)
    assert not result.modified and result.stats["compute_ops"] == 4 and result.stats["annotated"] == 0
    assert all(meta.op_info(n) is None for n in gm.graph.nodes if meta.inserted(n) is not None)


def test_a_rule_matching_no_module_path_names_the_closest_ones():
    with pytest.raises(fracpass.PlanError, match=r"plan rule 1 \(match='fcc'\) matches no compute op in the model; "
                                                 r"closest module paths: fc"):
        _annotate(fracpass.Plan.static(8, 8, 8, rules=[fracpass.Rule(match="conv", w=4), fracpass.Rule(match="fcc", w=4)]))


def test_a_rule_of_a_kind_the_model_lacks_lists_the_models_kinds():
    with pytest.raises(fracpass.PlanError, match=r"plan rule 0 \(kind='conv1d'\) matches no compute op in the model; no op "
                                                 r"of kind 'conv1d'; the model's op kinds are conv2d, linear, matmul"):
        _annotate(fracpass.Plan.static(8, 8, 8, rules=[fracpass.Rule(kind="conv1d", w=4)]))


def test_a_model_without_compute_ops_gets_nothing_and_is_not_modified():
    gm = captured(nn.Sequential(nn.ReLU(), nn.Flatten()), (X,))
    result = AnnotatePass(fracpass.Plan.static(8, 8, 8))(gm)
    assert not result.modified
    assert result.stats == {"compute_ops": 0, "excluded": 0, "annotated": 0, "by_kind": {}}
