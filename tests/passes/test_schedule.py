"""schedule (passes/schedule.py): an analysis pass reading every compute op's QSpec into a StagePlan, a Budget
switch resolved into AtSteps boundaries from the per-stage costs; the graph is left as it is."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fracpass
from fracpass.passes.schedule import SchedulePass
from fracpass.stageplan import BudgetResult, OpStages
from fracpass.switch import AtSteps, Budget

from ._pipeline import Toy, captured, gated_plan, transformed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(self.stem(x)))).mean((2, 3)))


X = torch.randn(2, 3, 6, 6)
LADDER = fracpass.Plan.progressive(fw=(4, 6, 8), bw=(6, 8, 8), exclude=("stem",),
                                   rules=[fracpass.Rule(match="fc", g=(8, 12, 16))])


def _budget(plan, fraction, total, granularity):
    return dataclasses.replace(plan, switch=Budget(fraction=fraction, total_steps=total, granularity=granularity))


def test_stage_plan_lists_every_compute_op_and_leaves_the_graph_alone():
    gm = transformed(Net(), LADDER, (X,))
    code, out = gm.code, gm(X)
    result = SchedulePass(LADDER)(gm)
    assert not result.modified and result.stats == {"ops": 3, "descending": 0}
    assert gm.code == code and torch.equal(gm(X), out)
    staged = result.result
    assert staged.stages == LADDER.stages and staged.budget is None and staged.gate_targets == ()
    assert staged.switch is None  # the plan gave none: passed on as it is (the Scheduler defaults it)
    assert staged.ops == (
        OpStages("stem", "conv2d", "stem", (32, 32, 32), (32, 32, 32), (32, 32, 32), "excluded by plan (exclude 'stem')"),
        OpStages("conv", "conv2d", "conv", (4, 6, 8), (4, 6, 8), (6, 8, 8)),
        OpStages("fc", "linear", "fc", (4, 6, 8), (4, 6, 8), (8, 12, 16)))
    assert staged.bits("fc", 1) == (6, 6, 12)
    again = SchedulePass(LADDER)(gm)  # an analysis: running it again gives the same plan
    assert again.result == staged and not again.modified


def test_gated_ops_name_their_unit_and_the_gates_targets_come_along():
    plan = dataclasses.replace(gated_plan(stages=2), gates=fracpass.Gates(target=(2.0, 3.0)))
    gm = transformed(Toy(), plan, (torch.randn(4, 4, 6, 6),))
    staged = SchedulePass(plan)(gm).result
    assert {o.op: o.gated for o in staged.ops} == {"b1_conv1": "b1", "b1_conv2": "b1", "b2_conv1": "b2",
                                                   "b2_conv2": "b2", "fc": ""}
    assert staged.bits("b1_conv1", 0) == (4, 6, 12) and staged.gate_targets == (2.0, 3.0)


def test_precision_going_down_between_stages_is_warned():
    plan = fracpass.Plan.progressive(fw=(8, 4), bw=(8, 8))
    gm = transformed(Net(), plan, (X,))
    with pytest.warns(UserWarning, match=r"precision goes down between stages \(the last stage should be the highest\) "
                                         r"for 3 op\(s\): stem, conv, fc"):
        result = SchedulePass(plan)(gm)
    assert result.stats == {"ops": 3, "descending": 3}


def test_a_budget_is_resolved_into_boundaries_meeting_it():
    gm = transformed(Net(), fracpass.Plan.progressive(fw=(4, 8), bw=(6, 8)), (X,))
    # two stages costing 1 and 2: b steps at 1 and T - b at 2 cost 0.7 * 2 * T at b = 0.6 T = 600, rounded up to
    # a multiple of 7: 602, which costs (602 + 2 * 398) / 2000 = 0.699 of the static plan
    plan = _budget(fracpass.Plan.progressive(fw=(4, 8), bw=(6, 8)), 0.7, 1000, 7)
    staged = SchedulePass(plan, stage_costs=[1.0, 2.0])(gm).result
    assert staged.switch == AtSteps((602,))
    assert staged.budget == BudgetResult(0.7, pytest.approx(0.699), 1000, (602,))
    # three stages costing 1, 2, 4 at half the budget: lam = 1/sqrt(2), the first boundary at 45.3% -> 450, the
    # last solved for exactly (775) and rounded up to 780: (450 + 2 * 330 + 4 * 220) / 4000 = 0.4975
    plan = _budget(LADDER, 0.5, 1000, 10)
    staged = SchedulePass(plan, stage_costs=[1.0, 2.0, 4.0])(transformed(Net(), LADDER, (X,))).result
    assert staged.switch == AtSteps((450, 780)) and staged.budget.predicted == pytest.approx(0.4975)


def test_a_graph_without_annotations_fails_the_precondition():
    with pytest.raises(fracpass.PlanError, match=r"schedule: the graph has no annotated compute ops; run "
                                                 r"fracpass.transform first"):
        SchedulePass(LADDER)(captured(Net(), (X,)))


def test_an_exclude_rule_followed_by_a_rule_setting_bits_is_a_conflict():
    plan = fracpass.Plan.static(8, 8, 8, exclude=("conv",), rules=[fracpass.Rule(match="conv", w=4)])
    gm = transformed(Net(), plan, (X,))
    with pytest.raises(fracpass.PlanError, match=r"conflicting plan rules: conv: rule 0 \(match='conv'\) excludes it but "
                                                 r"later rule 1 \(match='conv'\) sets its bits. Put the exclude rule last"):
        SchedulePass(plan)(gm)


@pytest.mark.parametrize("costs, fraction, granularity, match", [
    (None, 0.7, 10, r"schedule: budget mode needs the per-stage costs; call fracpass.schedule\(qmodel, plan\)"),
    ([2.0, 1.0], 0.7, 10, r"schedule: budget mode needs every stage cheaper than the last; per-sample BitOPs are "
                          r"\['2', '1'\]"),
    ([1.0, 2.0], 0.4, 10, r"schedule: budget 40.0% is at or below the cheapest stage's cost \(50.0% of the static "
                          r"plan\); no schedule can meet it"),
    ([1.0, 2.0], 0.7, 1500, r"schedule: cannot place 1 stage boundaries for budget 70.0% in 1000 steps at a "
                            r"granularity of 1500; lower the granularity"),
], ids=["no costs", "last stage not the dearest", "below the cheapest stage", "granularity too coarse"])
def test_budget_errors(costs, fraction, granularity, match):
    plan = _budget(fracpass.Plan.progressive(fw=(4, 8), bw=(6, 8)), fraction, 1000, granularity)
    gm = transformed(Net(), plan, (X,))
    with pytest.raises(fracpass.PlanError, match=match):
        SchedulePass(plan, stage_costs=costs)(gm)


def test_a_budget_over_one_stage_is_an_error():
    plan = _budget(fracpass.Plan.static(8, 8, 8), 0.7, 1000, 10)
    gm = transformed(Net(), plan, (X,))
    with pytest.raises(fracpass.PlanError, match=r"schedule: budget mode needs a ladder of at least two stages"):
        SchedulePass(plan, stage_costs=[1.0])(gm)
