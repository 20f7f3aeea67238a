"""cost-analysis (passes/cost_analysis.py): an analysis pass propagating the example inputs' shapes and costing
every annotated compute op (MACs, BitOPs per stage); it changes neither the graph nor the model's state."""
from __future__ import annotations

import torch
from torch import nn

import fracpass
from fracpass.passes.cost_analysis import CostAnalysisPass

from ._pipeline import captured, transformed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        return self.fc(torch.relu(self.conv(torch.nn.functional.dropout(h, 0.5))).mean((2, 3)))


X = torch.randn(2, 3, 6, 6)
LADDER = fracpass.Plan.progressive(fw=(4, 8), bw=(6, 8), exclude=("stem",))
# batch 2, 6x6 maps: a 3x3 conv computes N * Cout * H * W * Cin * 9 multiply-adds, a linear N * in * out
STEM, CONV, FC = 2 * 4 * 36 * 3 * 9, 2 * 4 * 36 * 4 * 9, 2 * 4 * 3


def _report(plan=LADDER, stage=0, gm=None):
    gm = gm if gm is not None else transformed(Net(), plan, (X,))
    return gm, CostAnalysisPass((X,), {}, plan.num_stages, stage)(gm)


def test_each_op_is_costed_from_the_example_shapes():
    _, result = _report()
    assert not result.modified and result.stats == {"costed_ops": 3, "not_costed": 0}
    report = result.result
    assert report.batch == 2 and report.num_stages == 2 and report.stage == 0
    costs = {o.op: o for o in report.ops}
    assert list(costs) == ["stem", "conv", "fc"]
    # the stem's input needs no gradient: no error product; the others have both
    assert (costs["stem"].forward_macs, costs["stem"].backward_macs) == (STEM, (0, STEM))
    assert (costs["conv"].forward_macs, costs["conv"].backward_macs) == (CONV, (CONV, CONV))
    assert (costs["fc"].forward_macs, costs["fc"].backward_macs) == (FC, (FC, FC))
    assert costs["conv"].roles == ("act", "weight") and costs["conv"].operand_elems == (2 * 4 * 36, 4 * 4 * 9)
    assert costs["stem"].excluded and costs["stem"].w == (32, 32) and costs["conv"].g == (6, 8)


def test_bitops_per_stage_match_a_hand_count():
    _, result = _report()
    report = result.result

    def hand(a, w, g):  # forward a x w; input gradient g x w; weight gradient g x a; the stem at 32 bits
        return {"forward": (CONV + FC) * a * w + STEM * 32 * 32, "backward_error": (CONV + FC) * g * w,
                "backward_weight": (CONV + FC) * g * a + STEM * 32 * 32}

    for stage, bits in ((0, (4, 4, 6)), (1, (8, 8, 8))):
        want = hand(*bits)
        want["total"] = sum(want.values())
        assert report.bitops(stage, per="batch") == want
    fp32 = report.fp32_bitops(per="batch")
    assert fp32["total"] == 1024 * (3 * (CONV + FC) + 2 * STEM)
    assert report.bitops(0)["total"] == report.bitops(0, per="batch")["total"] / 2  # per sample by default


def test_the_graph_the_model_state_and_the_rng_are_left_as_they_were():
    gm = transformed(Net(), LADDER, (X,))
    gm.train()
    gm(torch.randn(2, 3, 6, 6))  # running statistics and activation ranges to keep
    code = gm.code
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    rng = torch.get_rng_state()
    _, result = _report(gm=gm)
    assert not result.modified and gm.code == code
    assert state.keys() == gm.state_dict().keys()
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout in forward drew nothing that stayed drawn
    gm.graph.lint()
    again = CostAnalysisPass((X,), {}, 2, 0)(gm)
    assert [(o.op, o.forward_macs) for o in again.result.ops] == [(o.op, o.forward_macs) for o in result.result.ops]


def test_another_batch_scales_the_macs_and_a_stage_is_remembered():
    gm = transformed(Net(), LADDER, (X,))
    report = CostAnalysisPass((torch.randn(5, 3, 6, 6),), {}, 2, 1)(gm).result
    assert report.batch == 5 and report.stage == 1
    assert {o.op: o.forward_macs for o in report.ops} == {"stem": STEM * 5 // 2, "conv": CONV * 5 // 2, "fc": FC * 5 // 2}
    assert report.bitops()["forward"] == report.bitops(1)["forward"]


def test_module_calls_fracpass_did_not_annotate_are_costed_as_opaque_at_full_precision():
    gm = captured(Net(), (X,))  # no pass ran: every module call is a leaf fracpass cannot see into
    result = CostAnalysisPass((X,), {}, 1, 0)(gm)
    assert not result.modified and result.stats == {"costed_ops": 3, "not_costed": 0}
    assert [(o.op, o.kind, o.forward_macs, o.backward_macs, o.w, o.a, o.g) for o in result.result.ops] == [
        ("stem", "opaque", STEM, (0, STEM), (32,), (32,), (32,)), ("conv", "opaque", CONV, (CONV, CONV), (32,), (32,), (32,)),
        ("fc", "opaque", FC, (FC, FC), (32,), (32,), (32,))]
    assert result.result.ops[0].excluded.startswith("inside leaf module 'stem' (Conv2d): its compute runs at full precision")
