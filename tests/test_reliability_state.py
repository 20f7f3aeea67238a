"""Issue 14: state that survives checkpoints and bad batches (plan-checked loads, NaN-safe ranges, empty
batches, 1-bit gradients refused, the kernel build's name, bit-exact resume)."""
from __future__ import annotations

import logging
import os
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from fracpass import kernels
from fracpass.errors import PlanError
from fracpass.gating import GatedActQuant, GateHub
from fracpass.quant import ActQuant


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + x)


class Toy(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.b1, self.b2 = Block(c), Block(c)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(self.b2(self.b1(x)).mean((2, 3)))


def linear(plan, seed=0):
    torch.manual_seed(seed)
    return fracpass.transform(TwoLinear(), plan, example_inputs=(torch.randn(2, 4),))


def gated(plan=None, seed=0):
    torch.manual_seed(seed)
    plan = plan or fracpass.Plan.static(8, 8, 8).with_gates(fracpass.Gates())
    return fracpass.transform(Toy(), plan, example_inputs=(torch.randn(2, 4, 6, 6),))


def ranges(qmodel):
    return {k: v.clone() for k, v in qmodel.state_dict().items() if k.endswith(("running_min", "running_max",
                                                                                 "range_ready"))}


# -- item 2: a checkpoint from another plan ---------------------------------------------------------
LOW = fracpass.Plan.progressive(fw=(3, 4, 6), bw=(6, 6, 8))
HIGH = fracpass.Plan.progressive(fw=(8, 8, 8), bw=(8, 8, 8))


def test_loading_a_checkpoint_of_another_plan_names_the_quantizers_and_both_plans_bits():
    low, high = linear(LOW), linear(HIGH)
    fracpass.set_stage(low, 2)
    low(torch.randn(3, 4))
    with pytest.raises(PlanError, match=r"(?s)different plan.*6 of 6 quantizers.*fc1_aq: stage_bits \[3, 4, 6\] in the "
                                        r"checkpoint, \[8, 8, 8\] in this model's plan"):
        high.load_state_dict(low.state_dict())
    assert all(q.bits == 8 and int(q.stage) == 0 for _, q in fracpass.quantizers(high))  # nothing was loaded


def test_loading_a_checkpoint_with_more_stages_than_the_plan_is_a_plan_error_not_an_index_error():
    low = linear(LOW)
    fracpass.set_stage(low, 2)
    with pytest.raises(PlanError, match=r"fc1_wq: stage_bits \[3, 4, 6\] in the checkpoint, \[8\] in this model's plan"):
        linear(fracpass.Plan.static()).load_state_dict(low.state_dict())


def test_a_standalone_quantizer_checks_its_plan_state_and_stage_on_load():
    q = ActQuant([3, 4, 6])
    with pytest.raises(PlanError, match=r"quantizer 'ActQuant': stage_bits \[3, 4, 6\] in the checkpoint, \[8, 8\]"):
        ActQuant([8, 8]).load_state_dict(q.state_dict())
    state = ActQuant([8, 8]).state_dict()
    state["stage"] = torch.tensor(2)
    with pytest.raises(PlanError, match=r"quantizer 'ActQuant': the checkpoint is at stage 2 but this model's plan "
                                        r"has 2 stage\(s\)"):
        ActQuant([8, 8]).load_state_dict(state)


def test_same_plan_round_trips_stage_and_ranges():
    a, b = linear(LOW), linear(LOW, seed=1)
    fracpass.set_stage(a, 1)
    a(torch.randn(5, 4))
    b.load_state_dict(a.state_dict())
    assert fracpass.current_stage(b) == 1 and all(q.bits == 4 for n, q in fracpass.quantizers(b) if n.endswith("aq"))
    assert all(torch.equal(v, ranges(a)[k]) for k, v in ranges(b).items())


def test_a_gated_checkpoint_of_other_gate_options_is_refused():
    a = gated(fracpass.Plan.static(8, 8, 8).with_gates(fracpass.Gates(a=(3, 6), g=(6, 8), target=2.0)))
    b = gated(fracpass.Plan.static(8, 8, 8).with_gates(fracpass.Gates(a=(4, 8), g=(6, 8), target=2.0)))
    with pytest.raises(PlanError, match=r"b1_conv1_aq: stage_bits \[6\] in the checkpoint, \[8\] in this model's plan; options \[3, 6\] in the checkpoint, \[4, 8\]") as info:
        b.load_state_dict(a.state_dict())
    assert "gates: options_a [3, 6] in the checkpoint, [4, 8] in this model's plan" in str(info.value)
    c = gated(fracpass.Plan.static(8, 8, 8).with_gates(fracpass.Gates(a=(3, 6), g=(6, 8), target=2.5)))
    with pytest.raises(PlanError, match=r"gates: targets \[2\.0\] in the checkpoint, \[2\.5\]"):
        c.load_state_dict(a.state_dict())


# -- item 4: non-finite batches ---------------------------------------------------------------------
def _train(model, batches, opt):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        if not torch.isfinite(loss):  # the documented way: skip backward and the optimizer step
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()


def _batches(nan_at=None):
    g = torch.Generator().manual_seed(3)
    out = [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)]
    if nan_at is not None:
        x = torch.randn(8, 4)
        x[2, 1] = float("nan")
        out.insert(nan_at, (x, torch.zeros(8, dtype=torch.long)))
    return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_non_finite_batch_does_not_poison_the_ranges(bad, caplog):
    test = torch.randn(5, 4)
    batches = _batches()
    poisoned = list(batches)
    x = torch.randn(8, 4)
    x[2, 1] = bad
    poisoned.insert(2, (x, torch.zeros(8, dtype=torch.long)))
    # plain PyTorch recovers when the step is skipped
    torch.manual_seed(0)
    plain = TwoLinear()
    clean = TwoLinear()
    clean.load_state_dict(plain.state_dict())
    _train(plain, poisoned, torch.optim.SGD(plain.parameters(), lr=0.1))
    _train(clean, batches, torch.optim.SGD(clean.parameters(), lr=0.1))
    assert torch.equal(plain(test), clean(test))
    # so does the transformed model: its ranges never saw the bad batch
    q, ref = linear(fracpass.Plan.static(4, 4, 8)), linear(fracpass.Plan.static(4, 4, 8))
    with caplog.at_level(logging.WARNING, logger="fracpass"):
        torch.manual_seed(5)
        _train(q, poisoned, torch.optim.SGD(q.parameters(), lr=0.1))
        torch.manual_seed(5)
        _train(ref, batches, torch.optim.SGD(ref.parameters(), lr=0.1))
        assert all(torch.isfinite(v).all() for v in ranges(q).values())
        q.eval(), ref.eval()
        out = q(test)
        q.train(), q.eval()  # warned once, not on every switch
    assert torch.isfinite(out).all() and torch.equal(out, ref(test))
    assert all(torch.equal(v, ranges(ref)[k]) for k, v in ranges(q).items())
    warned = sorted(r.getMessage() for r in caplog.records if "non-finite" in r.getMessage())
    # one line for the batch: how many quantizers skipped it, and which (issue 31: one warning, not one each)
    assert len(warned) == 1 and "(fc1_aq, fc2_aq)" in warned[0], warned
    assert warned[0].startswith("2 activation quantizer(s) skipped range updates for up to 1 non-finite")


def test_a_non_finite_first_batch_leaves_the_quantizer_without_a_range():
    q = ActQuant([8]).train()
    q(torch.tensor([1.0, float("nan")]))
    q(torch.tensor([-1.0, 2.0]))  # the first finite batch sets the range outright, no EMA from zeros
    assert float(q.running_min) == -1.0 and float(q.running_max) == 2.0
    q = ActQuant([8]).train()
    q(torch.tensor([float("inf"), 0.0]))
    q.eval()
    assert not bool(q.range_ready) and not q._range_ready  # eval falls back to the batch range
    x = torch.tensor([-4.0, 4.0])
    assert (q(x) - x).abs().max() <= 8.0 / 255 / 2 + 1e-6


def test_tracking_non_finite_batches_needs_no_host_sync(monkeypatch):
    calls = []
    for name in ("item", "tolist", "cpu", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(self, *a, **k))
    aq = ActQuant([4]).train()
    for x in (torch.randn(8), torch.full((8,), float("nan")), torch.randn(8)):
        aq(x)
    monkeypatch.undo()
    assert calls == [] and int(aq.nonfinite_batches) == 1


def test_gated_ranges_skip_non_finite_groups(caplog):
    q, ref = gated(), gated()
    x = torch.randn(8, 4, 6, 6)
    q(x), ref(x)
    bad = torch.randn(8, 4, 6, 6)
    bad[3, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="fracpass"):
        q(bad)
        q.eval(), ref.eval()
    for k, v in ranges(q).items():
        assert torch.equal(v, ranges(ref)[k]), k
    test = torch.randn(3, 4, 6, 6)
    assert torch.isfinite(q(test)).all() and torch.equal(q(test), ref(test))
    assert any("b1_conv1_aq" in r.getMessage() and "non-finite" in r.getMessage() for r in caplog.records)


def test_scheduler_leaves_non_finite_losses_out_of_the_plateau_window(caplog):
    from test_schedule import EXPECTED, RULE, WINDOWS, losses, tiny_model

    sched = fracpass.Scheduler(tiny_model(fracpass.Plan.progressive(switch=RULE)))
    sequence = losses(WINDOWS)
    sequence[4] = float("nan")  # window 3 (iterations 5, 6): its mean is the finite loss alone
    sequence[9] = float("inf")
    with caplog.at_level(logging.WARNING, logger="fracpass.scheduler"):
        for loss in sequence:
            sched.step(torch.tensor(loss))
    assert [h[:3] for h in sched.history] == EXPECTED
    assert sched.nonfinite_steps == 2
    assert "non-finite training loss at 1 of the last 2 iterations" in caplog.text


# -- item 5: empty batches, 1-bit gradients ----------------------------------------------------------
@pytest.mark.parametrize("make, shape", [(lambda: linear(fracpass.Plan.progressive(fw=(4, 8), bw=(6, 8))), (4,)),
                                         (gated, (4, 6, 6))], ids=["pfq", "gated"])
def test_an_empty_batch_runs_in_train_and_eval_and_leaves_ranges_alone(make, shape):
    q = make()
    q(torch.randn(3, *shape))
    before = ranges(q)
    for mode in (True, False):
        q.train(mode)
        x = torch.randn(0, *shape, requires_grad=True)
        out = q(x)
        assert out.shape[0] == 0
        if mode:
            (out.sum() + fracpass.gate_loss(q)).backward()
            assert x.grad.shape == x.shape
        assert all(torch.equal(v, before[k]) for k, v in ranges(q).items())


def test_gradient_bits_below_two_are_refused():
    for make in (lambda: fracpass.Plan.static(g=1), lambda: fracpass.Stage(w=8, a=8, g=1),
                 lambda: fracpass.Plan.progressive(fw=(4, 8), bw=(1, 8)), lambda: fracpass.Rule(match="fc", g=1),
                 lambda: fracpass.Rule(match="fc", g=(8, 1)), lambda: fracpass.Gates(a=(4, 8), g=(1, 8))):
        with pytest.raises(PlanError, match=r"(g|bw)[^=]*= 1: gradient bits must be from 2 to 32 \(32 = not quantized\); "
                                            r"1-bit stochastic rounding"):
            make()
    fracpass.Plan.static(w=1, a=1, g=2)  # 1-bit weights and activations stay allowed


# -- item 7: the fused kernel's build name -----------------------------------------------------------
def test_kernel_build_name_follows_source_flags_and_torch_version():
    name = kernels.build_name("int f();", ["-O3"], "2.13.0")
    assert name.startswith("fracpass_quant_cpu_") and name == kernels.build_name("int f();", ["-O3"], "2.13.0")
    assert name != kernels.build_name("int g();", ["-O3"], "2.13.0")
    assert name != kernels.build_name("int f();", ["-O2"], "2.13.0")
    assert name != kernels.build_name("int f();", ["-O3"], "2.12.0")
    # the default: this checkout's sources (quant_cpu.cpp and the dither.h it includes), flags and torch version
    assert kernels.build_name() == kernels.build_name(kernels.source_text(), kernels.FLAGS, torch.__version__)


def test_a_kernel_build_is_logged_each_time_one_runs(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    built = []

    def fake_load(name, sources, **kwargs):  # stands in for the compiler: writes the .so it would
        so = pathlib.Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so"
        if rebuild or not so.exists():
            so.write_bytes(b"%d" % len(built))
            os.utime(so, (1e9 + len(built), 1e9 + len(built)))
            built.append(sources)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with caplog.at_level(logging.INFO, logger="fracpass.kernels"):
        rebuild = False
        assert kernels._build("fracpass_quant_cpu_test") == "module"
        assert "building fracpass's fused CPU quantizer kernels" in caplog.text
        caplog.clear()
        assert kernels._build("fracpass_quant_cpu_test") == "module"  # cached: no build, no message
        assert "building" not in caplog.text and "rebuilt" not in caplog.text
        rebuild = True
        kernels._build("fracpass_quant_cpu_test")
        assert "rebuilt fracpass's fused CPU quantizer kernels" in caplog.text
    # the build compiles a copy of the source kept beside it, so checkouts never fight over one path
    assert all(pathlib.Path(s[0]).parent == tmp_path / "fracpass_quant_cpu_test" for s in built)


# -- item 8: bit-exact resume ---------------------------------------------------------------------
def _run(q, opt, sched, steps, log, gates=False):
    for _ in range(steps):
        x = torch.randn(8, *((4, 6, 6) if gates else (4,)))  # data from torch's generator, as a loader's shuffle
        y = torch.randint(0, 3 if gates else 2, (8,))
        loss = F.cross_entropy(q(x), y) + (fracpass.gate_loss(q) if gates else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(loss)
        log.append(float(loss.detach()))


# plateau: the rule switches at iteration 4 (its second window); the checkpoint at 3 is mid-window
PLATEAU = fracpass.LossPlateau(threshold=100.0, window=2, eval_every=2, scale_windows=1)


@pytest.mark.parametrize("gates, switch, saved_at", [(False, fracpass.AtSteps((3,)), 2),
                                                     (True, fracpass.AtSteps((3,)), 2),
                                                     (False, PLATEAU, 3)], ids=["pfq", "gated", "plateau"])
def test_resume_from_a_checkpoint_is_bit_exact_across_a_stage_switch(gates, switch, saved_at, tmp_path):
    if gates:
        plan = fracpass.Plan(stages=(fracpass.Stage(4, 6, 8), fracpass.Stage(8, 8, 8)), switch=switch).with_gates(
            fracpass.Gates(a=(3, 6), g=(6, 8), target=(2.0, 3.0)))
        make = lambda: gated(plan)
    else:
        make = lambda: linear(fracpass.Plan.progressive(fw=(3, 8), bw=(6, 8), switch=switch))

    def start():
        q = make()
        opt = torch.optim.SGD(q.parameters(), lr=0.05, momentum=0.9)
        return q, opt, fracpass.Scheduler(q)

    torch.manual_seed(11)
    q, opt, sched = start()
    straight = []
    _run(q, opt, sched, 6, straight, gates)
    assert sched.stage == 1

    torch.manual_seed(11)
    q1, opt1, sched1 = start()
    resumed = []
    _run(q1, opt1, sched1, saved_at, resumed, gates)  # stops before the switch
    assert sched1.stage == 0
    fracpass.save_checkpoint(tmp_path / "ckpt.pt", q1, opt1, sched1, epoch=7)
    torch.manual_seed(99)  # whatever the new process does before loading
    q2, opt2, sched2 = start()
    extra = fracpass.load_checkpoint(tmp_path / "ckpt.pt", q2, opt2, sched2)
    assert extra == {"epoch": 7}
    _run(q2, opt2, sched2, 6 - saved_at, resumed, gates)
    assert resumed == straight and sched2.history == sched.history
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), q2.state_dict().values()))

    # what the helper adds over the three state_dicts: the noise generator's state
    torch.manual_seed(99)
    q3, opt3, sched3 = start()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    q3.load_state_dict(saved["model"]), opt3.load_state_dict(saved["optimizer"]), sched3.load_state_dict(saved["scheduler"])
    without_rng = resumed[:saved_at]
    _run(q3, opt3, sched3, 6 - saved_at, without_rng, gates)
    assert without_rng != straight


def test_load_checkpoint_refuses_a_checkpoint_of_another_plan(tmp_path):
    low = linear(fracpass.Plan.progressive(fw=(3, 8), bw=(6, 8)))
    fracpass.save_checkpoint(tmp_path / "c.pt", low)
    other = linear(fracpass.Plan.progressive(fw=(3, 8), bw=(6, 8), switch=fracpass.AtSteps((5,))))
    with pytest.raises(PlanError, match=r"load_checkpoint: .*c\.pt' was saved with a different plan.*switch: "
                                        r"None in the checkpoint, .*at_steps.* in this model's plan"):
        fracpass.load_checkpoint(tmp_path / "c.pt", other)
