"""A model that cannot be captured whole (a detector with data-dependent post-processing) is
quantized by transforming its parts; the public API then treats the parts as one model."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fracpass
from fracpass.models import detection_batch, tiny_detector

IDENTITY_THEN_8 = fracpass.Plan(stages=(fracpass.Stage(32, 32, 32), fracpass.Stage(8, 8, 8)))
LADDER = fracpass.Plan.progressive(fw=(4, 8), bw=(8, 8), switch=fracpass.AtSteps((2,)))


def transform_parts(model, plan, images, head_plan=None, neck_plan=None):
    """Each part gets the inputs it sees inside the model, read in eval mode: a train-mode forward
    would move BatchNorm's running statistics of the copy and not of the original."""
    model.eval()
    with torch.no_grad():
        features = model.backbone(images)
        pyramid = model.neck(features)
    model.train()
    model.backbone = fracpass.transform(model.backbone, plan, example_inputs=(images,))
    model.neck = fracpass.transform(model.neck, neck_plan or plan, example_inputs=(features,))
    model.head = fracpass.transform(model.head, head_plan or plan, example_inputs=(pyramid[0],))
    return model


def quantizer_stages(model):
    return {int(q.stage) for _, q in fracpass.quantizers(model)}


def test_whole_detector_cannot_be_captured_and_the_error_says_why():
    images, targets = detection_batch()
    with pytest.raises(fracpass.TraceError, match=r"(?s)Proxy object cannot be iterated.*data-dependent"):
        fracpass.transform(tiny_detector(), fracpass.Plan.static(), example_inputs=(images, targets))


def test_transformed_parts_at_32_bits_equal_the_original_in_train_and_eval():
    torch.manual_seed(0)
    images, targets = detection_batch()
    original = tiny_detector()
    model = transform_parts(copy.deepcopy(original), IDENTITY_THEN_8, images)
    assert all(isinstance(m, fracpass.QuantizedGraphModule) for m in (model.backbone, model.neck, model.head))
    ref, out = original(images, targets), model(images, targets)
    assert ref.keys() == out.keys() and all(torch.equal(ref[k], out[k]) for k in ref)
    sum(ref.values()).backward()
    sum(out.values()).backward()
    for (name, p), (qname, q) in zip(original.named_parameters(), model.named_parameters()):
        assert name == qname and torch.equal(p.grad, q.grad), name
    original.eval(), model.eval()  # the parent's eval() re-captures every part in eval mode
    for ref_det, det in zip(original(images), model(images)):
        assert all(torch.equal(ref_det[k], det[k]) for k in ref_det)


def test_set_stage_and_current_stage_switch_every_part_together():
    images, _ = detection_batch()
    model = transform_parts(tiny_detector(), LADDER, images)
    fracpass.set_stage(model, 1)
    assert quantizer_stages(model.backbone) == quantizer_stages(model.neck) == quantizer_stages(model.head) == {1}
    assert fracpass.current_stage(model) == 1
    fracpass.set_stage(model, -2)
    assert quantizer_stages(model) == {0} and fracpass.current_stage(model) == 0
    assert sum(1 for _ in fracpass.quantizers(model)) == sum(
        sum(1 for _ in fracpass.quantizers(p)) for p in (model.backbone, model.neck, model.head))


def test_cost_sums_the_parts_and_counts_a_shared_head_once_per_level():
    images, targets = detection_batch()
    model = transform_parts(tiny_detector(), LADDER, images)
    parts = [fracpass.cost(p) for p in (model.backbone, model.neck, model.head)]
    once = fracpass.cost(model)  # each part once, on its transform example inputs
    assert once.forward_macs.per_batch == sum(r.forward_macs.per_batch for r in parts)
    assert once.bitops(0)["total"] == pytest.approx(sum(r.bitops(0)["total"] for r in parts))
    assert {op.op.split(":")[0] for op in once.ops} == {"backbone", "neck", "head"}
    assert all(op.module.startswith(op.op.split(":")[0]) for op in once.ops)

    full = fracpass.cost(model, (images, targets))  # every call: the head runs on 3 levels
    assert {op.op.split(":")[0] for op in full.ops} == {"backbone", "neck", "head", "head[2]", "head[3]"}
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            tiny_detector().train()(images, targets)
    assert full.forward_macs.per_batch == counter.get_total_flops() // 2
    assert 0 < full.relative_to_fp32(0) < full.relative_to_fp32(1) < 1
    # costing ran the model but changed nothing: BatchNorm statistics are as they were
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    fracpass.cost(model, (images, targets))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert full.training([10, 10]).bitops > 0


def test_cost_lists_modules_outside_the_parts_as_not_costed():
    images, targets = detection_batch()
    model = tiny_detector()
    model.backbone = fracpass.transform(model.backbone, LADDER, example_inputs=(images,))
    report = fracpass.cost(model, (images, targets))
    assert any(name == "head.cls" and "outside the transformed parts" in why for name, why in report.not_costed)
    assert "outside the transformed parts (full precision, not costed): neck.lateral.0" in fracpass.summary(model)


def test_scheduler_switches_all_parts_together_and_resumes():
    images, targets = detection_batch()
    model = transform_parts(tiny_detector(), LADDER, images)
    sched = fracpass.Scheduler(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        loss = sum(model(images, targets).values()) + fracpass.gate_loss(model)
        loss.backward(), opt.step(), opt.zero_grad()
        sched.step(loss)
    assert sched.history == [(2, 0, 1, sched.history[0][3])] and quantizer_stages(model) == {1}
    fresh = transform_parts(tiny_detector(), LADDER, images)
    resumed = fracpass.Scheduler(fresh)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.history == sched.history and quantizer_stages(fresh) == {1} and fracpass.current_stage(fresh) == 1


def test_gate_loss_sums_the_parts_regularisers_and_summary_lists_every_part():
    images, targets = detection_batch()
    gates = fracpass.Gates(a=(4, 8), g=(8, 8), w=8, target=5.0, beta=1e-2)
    model = transform_parts(tiny_detector(), fracpass.Plan.static(w=8, a=8, g=8).with_gates(gates), images,
                            head_plan=fracpass.Plan.static(w=8, a=8, g=8), neck_plan=fracpass.Plan.static(w=8, a=8, g=8).with_gates(
                                fracpass.Gates(a=(4, 8), g=(8, 8), w=8, granularity="op", target=5.0, beta=1e-2)))
    losses = model(images, targets)
    total = fracpass.gate_loss(model)
    parts = fracpass.gate_loss(model.backbone) + fracpass.gate_loss(model.neck) + fracpass.gate_loss(model.head)
    assert fracpass.gate_loss(model.head).item() == 0.0  # no gates: transformed with a plan without them
    assert total.item() == parts.item() != 0.0
    (sum(losses.values()) + total).backward()
    assert model.backbone.gates.proj.weight.grad is not None and model.neck.gates.proj.weight.grad is not None
    report = fracpass.cost(model, (images, targets))
    assert {u.split(":")[0] for u in report.gates.unit_costs} == {"backbone", "neck"}
    text = fracpass.summary(model)
    assert "holds 3 transformed parts: backbone, neck, head" in text
    assert "[backbone]" in text and "[neck]" in text and "[head]" in text and "gates:" in text


# -- what does not work, said clearly ------------------------------------------------------------------
def test_parts_with_different_stage_counts_cannot_switch_together():
    images, _ = detection_batch()
    model = transform_parts(tiny_detector(), LADDER, images, head_plan=fracpass.Plan.static())
    with pytest.raises(fracpass.PlanError, match=r"different numbers of stages \(backbone: 2, neck: 2, head: 1\)"):
        fracpass.set_stage(model, 1)
    with pytest.raises(fracpass.PlanError, match=r"different numbers of stages"):
        fracpass.Scheduler(model)


def test_parts_in_different_stages_are_reported():
    images, _ = detection_batch()
    model = transform_parts(tiny_detector(), LADDER, images)
    fracpass.set_stage(model.head, 1)
    with pytest.raises(fracpass.FracpassError, match=r"different stages \(backbone: 0, neck: 0, head: 1\); switch them"):
        fracpass.current_stage(model)


def test_parts_with_different_switch_rules_need_an_explicit_plan():
    images, _ = detection_batch()
    other = fracpass.Plan.progressive(fw=(4, 8), bw=(8, 8), switch=fracpass.AtSteps((5,)))
    model = transform_parts(tiny_detector(), LADDER, images, head_plan=other)
    with pytest.raises(fracpass.PlanError, match=r"different switch rules .*fracpass\.Scheduler\(model, plan\)"):
        fracpass.Scheduler(model)
    assert fracpass.Scheduler(model, other).rule == fracpass.AtSteps((5,))


def test_a_model_without_transformed_parts_is_refused():
    with pytest.raises(fracpass.FracpassError, match=r"TinyDetector is not a model returned by fracpass\.transform\(\) "
                                                     r"and holds no transformed part.*model\.backbone = fracpass"):
        fracpass.set_stage(tiny_detector(), 0)


def test_gate_stats_and_symbolic_costs_of_several_parts_ask_for_one_part():
    images, targets = detection_batch()
    model = transform_parts(tiny_detector(), LADDER, images)
    with pytest.raises(fracpass.FracpassError, match=r"gate_stats: .* holds several transformed parts .*"
                                                     r"fracpass\.gate_stats\(model\.backbone\)"):
        fracpass.gate_stats(model)
    with pytest.raises(fracpass.FracpassError, match=r"symbolic: the report sums several transformed parts"):
        fracpass.cost(model).symbolic("total")


def test_cost_says_when_the_whole_model_does_not_run_on_the_inputs():
    images, _ = detection_batch()
    model = transform_parts(tiny_detector(), LADDER, images)
    with pytest.raises(fracpass.FracpassError, match=r"cost: running TinyDetector on the example inputs .* failed: "
                                                     r"ValueError: TinyDetector in training mode needs targets"):
        fracpass.cost(model, (images,))
