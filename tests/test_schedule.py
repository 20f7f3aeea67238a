"""PFQ: switch rules, the scheduler pass (StagePlan), budget mode and the runtime Scheduler."""
import pytest
import torch
from torch import nn

import fracpass
from conftest import EXAMPLE_MODELS
from fracpass import LossPlateau

RULE = LossPlateau(threshold=0.1, decay=0.5, window=3, eval_every=2, scale_windows=2)
# Window losses, each held for eval_every = 2 iterations. Worked by hand from the rule:
#  W1 10, W2 6: scale_loss = (10 + 6) / 2 = 8, frozen from here on.
#  W3 5:    recent [10, 6, 5]      |10 - 5| / 8 = 0.625 > 0.1           no switch
#  W4 5.1:  recent [6, 5, 5.1]     |6 - 5.1| / 8 = 0.1125 > 0.1         no switch
#  W5 5.05: recent [5, 5.1, 5.05]  max 0.00625 <= 0.1 -> switch 0->1 at iteration 10; threshold 0.05; cleared
#  W6 4.9, W7 4.8: fewer than 3 windows since the switch                no switch (window was cleared)
#  W8 4.7:  recent [4.9, 4.8, 4.7] max 0.025 <= 0.05 -> switch 1->2 at iteration 16; threshold 0.025
#  W9 4.0, W10 3.5, W11 3.45: [4.0, 3.5, 3.45] |4 - 3.45| / 8 = 0.06875 > 0.025   no switch
#  W12 3.44: [3.5, 3.45, 3.44]     max 0.0075 <= 0.025 -> switch 2->3 at iteration 24; threshold stays 0.025
#  W13..W16 3.0: last stage                                            no switch
WINDOWS = [10, 6, 5, 5.1, 5.05, 4.9, 4.8, 4.7, 4.0, 3.5, 3.45, 3.44, 3.0, 3.0, 3.0, 3.0]
EXPECTED = [(10, 0, 1), (16, 1, 2), (24, 2, 3)]


def tiny_model(plan):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return fracpass.transform(model, plan, example_inputs=(torch.randn(2, 4),))


def losses(windows, per=2):
    return [w for w in windows for _ in range(per)]


def test_loss_plateau_switches_where_fractrain_rule_says():
    qmodel = tiny_model(fracpass.Plan.progressive(switch=RULE))
    sched = fracpass.Scheduler(qmodel)
    thresholds = []
    for loss in losses(WINDOWS):
        switched = sched.step(torch.tensor(loss))
        if switched:
            thresholds.append(sched._rule_state.threshold)
    assert [h[:3] for h in sched.history] == EXPECTED
    assert thresholds == pytest.approx([0.05, 0.025, 0.025])  # decay after the 1st and 2nd switch only
    assert sched._rule_state.scale_loss == 8.0  # frozen after scale_windows
    assert fracpass.current_stage(qmodel) == 3 and sched.stage == 3
    assert all("loss plateau" in h[3] for h in sched.history)
    assert dict(fracpass.quantizers(qmodel))["_0_gq"].bits == 8


def test_no_switch_while_the_loss_falls_during_scale_forming():
    rule = LossPlateau(threshold=0.05, window=5, eval_every=3, scale_windows=10)
    sched = fracpass.Scheduler(tiny_model(fracpass.Plan.progressive(switch=rule)))
    for loss in losses([10 - 0.8 * k for k in range(10)], per=3):
        sched.step(loss)  # plain floats work too
    assert sched.history == [] and sched.iteration == 30


def test_at_steps_and_at_epochs():
    sched = fracpass.Scheduler(tiny_model(fracpass.Plan.progressive(switch=fracpass.AtSteps((3, 5, 9)))))
    for _ in range(12):
        sched.step()
    assert [h[:3] for h in sched.history] == [(3, 0, 1), (5, 1, 2), (9, 2, 3)]
    epochs = fracpass.AtEpochs(epochs=(1, 2, 4), steps_per_epoch=10)
    assert epochs.boundaries() == (10, 20, 40)
    sched = fracpass.Scheduler(tiny_model(fracpass.Plan.progressive(switch=epochs)))
    for _ in range(45):
        sched.step()
    assert [h[0] for h in sched.history] == [10, 20, 40]


def test_switch_rule_validation():
    with pytest.raises(fracpass.PlanError, match=r"AtSteps has 2 boundaries but the plan has 4 stages; give 3"):
        fracpass.Plan.progressive(switch=fracpass.AtSteps((10, 20)))
    with pytest.raises(fracpass.PlanError, match=r"boundaries must be strictly increasing"):
        fracpass.AtSteps((10, 5, 20))
    with pytest.raises(fracpass.PlanError, match=r"LossPlateau.threshold = 0: must be a positive number"):
        LossPlateau(threshold=0)
    with pytest.raises(fracpass.PlanError, match=r"LossPlateau.window = 1: needs at least 2"):
        LossPlateau(window=1)
    with pytest.raises(fracpass.PlanError, match=r"give either switch= or budget="):
        fracpass.Plan.progressive(switch=RULE, budget=0.5, total_steps=100)
    with pytest.raises(fracpass.PlanError, match=r"needs both budget="):
        fracpass.Plan.progressive(budget=0.5)
    with pytest.raises(fracpass.PlanError, match=r"a fraction of the static plan's BitOPs, at most 1"):
        fracpass.Budget(fraction=1.5, total_steps=10)
    sched = fracpass.Scheduler(tiny_model(fracpass.Plan.progressive()))
    with pytest.raises(fracpass.FracpassError, match=r"LossPlateau needs the iteration's training loss"):
        sched.step()


def test_plan_file_round_trip_with_switch(tmp_path):
    for switch in (RULE, fracpass.AtSteps((1, 2, 3)), fracpass.AtEpochs(epochs=(1, 2, 3), steps_per_epoch=7)):
        plan = fracpass.Plan.progressive(switch=switch)
        plan.save(tmp_path / "p.toml")
        assert fracpass.Plan.load(tmp_path / "p.toml") == plan
    budget = fracpass.Plan.progressive(budget=0.35, total_steps=64000)
    budget.save(tmp_path / "b.toml")
    assert fracpass.Plan.load(tmp_path / "b.toml") == budget
    (tmp_path / "bad.toml").write_text("[[stages]]\nw = 8\na = 8\ng = 8\n[switch]\nkind = 'cosine'\n")
    with pytest.raises(fracpass.PlanError, match=r"\[switch\] kind = 'cosine'; use one of"):
        fracpass.Plan.load(tmp_path / "bad.toml")


def test_stage_plan_round_trip_shows_overrides_and_exclusions(tmp_path):
    factory, make_input = EXAMPLE_MODELS["mobilenet_v2"]
    plan = fracpass.Plan.progressive(exclude=("classifier",), rules=[fracpass.Rule(kind="depthwise", w=8, g=16)],
                                     switch=RULE)
    qmodel = fracpass.transform(factory(), plan, example_inputs=(make_input(2),))
    staged = fracpass.schedule(qmodel)
    staged.save(tmp_path / "stages.toml")
    assert fracpass.StagePlan.load(tmp_path / "stages.toml") == staged
    text = (tmp_path / "stages.toml").read_text()
    assert 'excluded = "excluded by plan (exclude \'classifier\')"' in text
    depthwise = [o for o in staged.ops if o.kind == "conv2d" and o.w == (8, 8, 8, 8)]
    assert len(depthwise) == 17 and all(o.g == (16,) * 4 and o.a == (3, 4, 6, 8) for o in depthwise)
    assert staged.bits("features_1_conv_0", 0) == (8, 3, 16)
    shown = str(staged)
    assert "8>8>8>8" in shown and "16>16>16>16" in shown and "excluded: excluded by plan" in shown
    assert staged.switch == RULE


def test_conflicting_rules_are_named():
    plan = fracpass.Plan.progressive(rules=[fracpass.Rule(match="0", exclude=True), fracpass.Rule(match="*", g=16)])
    with pytest.raises(fracpass.PlanError, match=r"conflicting plan rules: _0: rule 0 \(match='0'\) excludes it but "
                                                 r"later rule 1 \(match='\*'\) sets its bits"):
        fracpass.schedule(tiny_model(plan))
    fine = fracpass.Plan.progressive(rules=[fracpass.Rule(match="*", g=16), fracpass.Rule(match="0", exclude=True)])
    assert fracpass.schedule(tiny_model(fine)).bits("_0", 0) == (32, 32, 32)


def test_descending_ladder_warns():
    plan = fracpass.Plan.progressive(fw=(8, 4), bw=(8, 8))
    with pytest.warns(UserWarning, match=r"precision goes down between stages .* for 2 op\(s\): _0, _2"):
        fracpass.schedule(tiny_model(plan))


@pytest.mark.parametrize("fraction", [0.3, 0.35, 0.5, 0.8])
def test_budget_boundaries_meet_the_budget_within_one_window(fraction):
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    plan = fracpass.Plan.progressive(budget=fraction, total_steps=64000)
    qmodel = fracpass.transform(factory(), plan, example_inputs=(make_input(2),))
    staged = fracpass.schedule(qmodel)
    bounds = staged.switch.boundaries()
    assert len(bounds) == 3 and all(b % 390 == 0 for b in bounds) and list(bounds) == sorted(bounds)
    report = fracpass.cost(qmodel)  # checked with the cost pass, independently of the schedule's arithmetic
    steps = [bounds[0], bounds[1] - bounds[0], bounds[2] - bounds[1], 64000 - bounds[2]]
    spent = report.training(steps_per_stage=steps, batch_size=1).bitops
    static = 64000 * report.bitops(-1)["total"]
    assert spent <= fraction * static * (1 + 1e-12)
    one_window = 390 * (report.bitops(3)["total"] - report.bitops(2)["total"])
    assert spent >= fraction * static - one_window
    assert staged.budget.predicted == pytest.approx(spent / static)
    sched = fracpass.Scheduler(qmodel)
    assert sched.rule == staged.switch


def test_budget_below_the_cheapest_stage_is_an_error():
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    plan = fracpass.Plan.progressive(budget=0.2, total_steps=64000)
    with pytest.raises(fracpass.PlanError, match=r"budget 20.0% is at or below the cheapest stage's cost \(23.4%"):
        fracpass.schedule(fracpass.transform(factory(), plan, example_inputs=(make_input(2),)))


def test_resume_gives_the_same_history():
    plan = fracpass.Plan.progressive(switch=RULE)
    sequence = losses(WINDOWS)
    straight = fracpass.Scheduler(tiny_model(plan))
    for loss in sequence:
        straight.step(torch.tensor(loss))
    for cut in (7, 11, 17, 23):  # mid-window and right after switches
        qmodel = tiny_model(plan)
        first = fracpass.Scheduler(qmodel)
        for loss in sequence[:cut]:
            first.step(torch.tensor(loss))
        saved_model, saved_sched = qmodel.state_dict(), first.state_dict()
        resumed_model = tiny_model(plan)
        resumed_model.load_state_dict(saved_model)
        resumed = fracpass.Scheduler(resumed_model)
        resumed.load_state_dict(saved_sched)
        assert fracpass.current_stage(resumed_model) == first.stage
        for loss in sequence[cut:]:
            resumed.step(torch.tensor(loss))
        assert resumed.history == straight.history


def test_repr_is_progress_friendly():
    sched = fracpass.Scheduler(tiny_model(fracpass.Plan.progressive(switch=RULE)))
    for loss in losses([10, 6, 5]):
        sched.step(loss)
    assert repr(sched) == ("Scheduler(stage 0/3 w/a/g 3/3/6, iteration 6, switches 0, plateau: 3/3 windows, "
                           "threshold 0.1, next window in 2 it)")


def test_switch_is_logged(caplog):
    import logging

    sched = fracpass.Scheduler(tiny_model(fracpass.Plan.progressive(switch=fracpass.AtSteps((1, 2, 3)))))
    with caplog.at_level(logging.INFO, logger="fracpass.scheduler"):
        sched.step()
    assert "iteration 1: stage 0 -> 1 (w/a/g 4/4/6): reached step 1" in caplog.text


def test_static_plan_never_switches():
    sched = fracpass.Scheduler(tiny_model(fracpass.Plan.static()))
    assert sched.rule is None and not sched.step(1.0) and sched.stage == 0
