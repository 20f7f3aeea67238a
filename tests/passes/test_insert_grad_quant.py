"""insert-grad-quant (passes/insert_grad_quant.py): a gradient quantizer (identity in forward) on the output of
every compute op whose plan quantizes gradients, every user of the output rerouted through it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fracpass
from fracpass import meta
from fracpass.gating import GatedGradQuant
from fracpass.passes import (AnnotatePass, InsertActQuantPass, InsertGatesPass, InsertGradQuantPass,
                             InsertWeightQuantPass)
from fracpass.quant import GradQuant

from ._pipeline import Toy, created_by, gated_plan, ops, prepared, split


class Net(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        h = self.conv(x)
        h = torch.relu(self.bn(h)) + h  # the conv's output has two users
        return self.fc(h.mean((2, 3)))


X = torch.randn(2, 3, 5, 5)
GRAD_ONLY = fracpass.Plan(stages=(fracpass.Stage(32, 32, 32), fracpass.Stage(32, 32, 3)))  # stage 1: g = 3 alone


def _prepared(plan=GRAD_ONLY, model=None):
    return prepared(model or Net(), plan, InsertGradQuantPass, (X,))


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def _stage(gm, k):
    for m in gm.modules():
        if isinstance(m, GradQuant):
            m.set_stage(k)


def test_runs_last_of_the_quantizer_passes():
    assert [type(p) for p in split(GRAD_ONLY, InsertGradQuantPass)[0]] == \
        [AnnotatePass, InsertWeightQuantPass, InsertActQuantPass]


def test_every_user_of_an_ops_output_reads_its_gradient_quantizer():
    gm, p = _prepared()
    p(gm)
    # weights at 32 bits: the module calls stay (only insert-weight-quant lowers them)
    assert ops(gm) == [("call_module", "conv", "conv"), ("call_module", "conv_gq", "conv_gq"),
                       ("call_module", "bn", "bn"), ("call_function", "relu", "relu"), ("call_function", "add", "add"),
                       ("call_method", "mean", "mean"), ("call_module", "fc", "fc"), ("call_module", "fc_gq", "fc_gq")]
    nodes = _nodes(gm)
    assert list(nodes["conv"].users) == [nodes["conv_gq"]] and nodes["conv_gq"].args == (nodes["conv"],)
    assert nodes["bn"].args == (nodes["conv_gq"],) and nodes["add"].args[1] is nodes["conv_gq"]
    assert nodes["output"].args == (nodes["fc_gq"],)  # the model's output too
    assert type(gm.get_submodule("fc_gq")) is GradQuant and gm.get_submodule("fc_gq").stage_bits.tolist() == [32, 3]


def test_32_bits_is_bit_identical_and_low_bits_round_the_outputs_gradient_onto_its_grid():
    torch.manual_seed(0)
    model = Net()
    gm, p = _prepared(model=model)
    p(gm)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    c = torch.randn(1, 64)
    out, ref = gm(x), model(x)
    assert torch.equal(out, ref)
    grads = torch.autograd.grad((out * c).sum(), [x, *gm.parameters()])
    ref_grads = torch.autograd.grad((ref * c).sum(), [x, *model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    _stage(gm, 1)
    out = gm(x)
    assert torch.equal(out, ref)  # identity in forward
    torch.manual_seed(1)
    (out * c).sum().backward()
    # with batch 1, fc's bias gradient is the gradient fc received: c rounded stochastically onto the 2^3 levels
    # of c's own range, mn + k * s, each entry one of the two levels around it
    q, g = gm.get_parameter("fc.bias").grad, c[0]
    s = (g.max() / 7 - g.min() / 7)
    k = (q - g.min()) / s
    assert torch.allclose(k, k.round(), atol=1e-4) and k.round().min() >= 0 and k.round().max() <= 7
    assert ((q - g).abs() < s * (1 + 1e-5)).all() and not torch.equal(q, g)
    assert q.unique().numel() <= 8 and q.unique().numel() >= 4


def test_contract_stats_metadata_idempotence():
    gm, p = _prepared()
    result = p(gm)
    assert result.modified and result.stats == {"grad_quant_inserted": 2, "gated": 0}
    gm.graph.lint()
    made = created_by(gm, "insert-grad-quant")
    assert [(n.name, meta.inserted(n)) for n in made] == [
        ("conv_gq", meta.Inserted("grad", "conv", "insert-grad-quant")),
        ("fc_gq", meta.Inserted("grad", "fc", "insert-grad-quant"))]
    code, modules = gm.code, len(list(gm.modules()))
    again = InsertGradQuantPass(GRAD_ONLY)(gm)
    assert not again.modified and again.stats == {"grad_quant_inserted": 0, "gated": 0}
    assert gm.code == code and len(list(gm.modules())) == modules


def test_only_ops_whose_plan_quantizes_gradients_get_one():
    plan = fracpass.Plan.static(4, 4, 32, rules=[fracpass.Rule(match="fc", g=8)])
    gm, p = _prepared(plan)
    assert p(gm).stats == {"grad_quant_inserted": 1, "gated": 0}
    assert [n.name for n in created_by(gm, "insert-grad-quant")] == ["fc_gq"]
    gm, p = _prepared(fracpass.Plan.static(4, 4, 32))
    code = gm.code
    result = p(gm)
    assert not result.modified and result.stats == {"grad_quant_inserted": 0, "gated": 0} and gm.code == code


def test_gated_ops_get_per_sample_quantizers_a_skip_option_passing_through():
    x = torch.randn(4, 4, 6, 6)
    plan = gated_plan(a=(0, 4, 8), g=(0, 6, 8))
    gm, p = prepared(Toy(), plan, InsertGradQuantPass, (x,))
    result = p(gm)
    assert result.stats == {"grad_quant_inserted": 5, "gated": 4}
    nodes = _nodes(gm)
    assert nodes["b1_conv2_gq"].args == (nodes["b1_conv2"], nodes["gate_b1_choice"])
    gq = gm.get_submodule("b1_conv2_gq")
    assert isinstance(gq, GatedGradQuant) and gq.options.tolist() == [32, 6, 8]  # a = 0 skips: its g unused
    assert nodes["fc_gq"].args == (nodes["fc"],) and type(gm.get_submodule("fc_gq")) is GradQuant
    assert not InsertGradQuantPass(plan)(gm).modified


def test_a_gated_op_without_its_gate_branch_is_a_pass_error():
    plan = gated_plan()
    gm, _ = prepared(Toy(), plan, InsertGatesPass, (torch.randn(4, 4, 6, 6),))
    with pytest.raises(fracpass.PassError, match=r"(?s)While processing %b1_conv1 .*belongs to gated unit 'b1' but no "
                                                 r"gate branch for it is in the graph; run insert-gates before"):
        InsertGradQuantPass(plan)(gm)


def test_a_submodule_holding_the_quantizers_name_is_a_pass_error():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc_gq = nn.Linear(4, 4), nn.Identity()

        def forward(self, x):
            return self.fc_gq(self.fc(x))

    gm, p = prepared(Clash(), fracpass.Plan.static(8, 8, 8), InsertGradQuantPass, (torch.randn(2, 4),))
    with pytest.raises(fracpass.PassError, match=r"already has a submodule 'fc_gq' \(Identity\) that is not this op's "
                                                 r"GradQuant\(\{'stage_bits': \[8\]\}\)"):
        p(gm)
