"""fracpass.bench / `fracpass bench`: measured step and per-op times beside the profile's prediction.

The predictions must be the cost model's own numbers on the profile scaled to the threads used;
the per-op measurements must attribute time to the right op; benchmarking must leave the user's
model as it was. No assertion here is about how fast anything runs.
"""
from __future__ import annotations

import json
import pathlib
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native
from fracpass.bench import bench
from fracpass.errors import FracpassError
from fracpass.targets import TargetError, load_target

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Uneven(nn.Module):
    """A heavy linear (512x1024 on 256 rows) beside a light one (8x8): 8192x the MACs."""

    def __init__(self):
        super().__init__()
        self.heavy = nn.Linear(1024, 512)
        self.squeeze = nn.Linear(512, 8)
        self.light = nn.Linear(8, 8)

    def forward(self, x):
        return self.light(torch.relu_(self.squeeze(torch.relu(self.heavy(x)))))


def _model(execution="simulate", plan=None, native=None):
    torch.manual_seed(0)
    x = torch.randn(256, 1024)
    return fracpass.transform(Uneven(), plan or fracpass.Plan.progressive(), example_inputs=(x,), execution=execution,
                              native=native), x


def test_predictions_are_the_cost_models_on_the_profile_scaled_to_the_threads():
    q, x = _model()
    report = bench(q, target="epyc9655", stages=[0, -1], repeats=1, warmup=0, threads=1)
    assert [s.stage for s in report.stages] == [0, 3] and report.threads == 1 and report.batch == 256
    scaled = load_target("epyc9655").per_cores(1)
    assert scaled.precisions[0].macs_per_s == pytest.approx(3.195e13 / 96)
    for st in report.stages:
        cost = fracpass.cost(q, target=scaled, stage=st.stage)
        assert [o.op for o in st.ops] == [o.op for o in cost.ops] == ["heavy", "squeeze", "light"]
        # at bits: exactly CostReport.latency_s on the scaled profile
        assert st.at_bits_s == pytest.approx(cost.latency_s(st.stage))
        # simulated: every product in float32, i.e. the FP32 model's roofline on the same profile
        fp32 = sum(scaled.latency_s(m, b, 32, 32) for o in cost.ops for _, m, _, _, b in o.products(None))
        assert st.as_run_s == pytest.approx(fp32)
        assert all(o.path == "simulated" and o.runs_on == ("fp32",) * 3 for o in st.ops)
        assert st.as_run_s > st.at_bits_s  # fp32 products at a quarter of int8's rate
    text = str(report)
    assert "stage 0 (3/3/6)" in text and "stage 3 (8/8/8)" in text and "epyc9655 x 1/96 cores" in text


def test_native_ops_are_predicted_at_the_precision_each_product_runs_on(monkeypatch):
    if native.int8_support() is not None:
        pytest.skip("this CPU has no int8 dot-product instructions: native runs simulated")
    q, x = _model("native", native=fracpass.NativeOptions(min_intensity=0.0))  # the 512x8 and 8x8 layers too
    report = bench(q, target="epyc9655", stages=[-1], repeats=1, warmup=0)
    st = report.stages[0]
    scaled = load_target("epyc9655").per_cores(report.threads)
    cost = {o.op: o for o in fracpass.cost(q, stage=3).ops}
    # per-channel weights: forward and g x a on int8, g x w on bf16 with the scale folded into the weight's
    # values where the CPU has bf16 units, else in float32
    gw = "bf16" if native.bf16_support() is None else "fp32"
    bf16 = lambda f: (f[0], f[1], 16, 16, f[4] / 2)  # 16-bit operands, half fp32's bytes
    for o in st.ops:
        assert o.path == "int8" and o.runs_on == ("int8", gw, "int8"), o
        c = cost[o.op]
        bits, fp32 = c.products(3), c.products(None)
        lat = lambda p: scaled.latency_s(p[1], p[4], p[2], p[3])
        assert o.as_run_forward_s == pytest.approx(lat(bits[0]))
        assert o.at_bits_s == pytest.approx(sum(lat(p) for p in bits))
        # the first op's input needs no gradient: only its weight-gradient product, on int8
        gw_product = bf16(fp32[1]) if gw == "bf16" else fp32[1]
        expect = [bits[0], gw_product, bits[2]] if len(bits) == 3 else [bits[0], bits[1]]
        assert o.as_run_s == pytest.approx(sum(lat(p) for p in expect))
    assert f"int8/{gw}/int8" in str(report)


def test_an_excluded_module_call_is_predicted_in_fp32_with_its_weight_gradient():
    # found by the README's `fracpass bench` on ResNet-20: an excluded stem stays a call_module, whose
    # weight is the module's parameter, not a graph operand; its products once came one entry short
    ladder = fracpass.Plan.progressive()
    plan = fracpass.Plan(ladder.stages, ladder.rules + (fracpass.Rule(match="heavy", exclude=True, reason="stem"),))
    q, x = _model("native", plan)
    runs = native.product_paths(q)
    cost = {o.op: o for o in fracpass.cost(q, stage=3).ops}
    assert cost["heavy"].excluded and cost["heavy"].roles == ("act", "weight")
    assert runs["heavy"] == ("fp32", "fp32", "fp32")
    st = bench(q, target="epyc9655", stages=[-1], repeats=1, warmup=0, threads=1).stages[0]
    heavy = next(o for o in st.ops if o.op == "heavy")
    scaled = load_target("epyc9655").per_cores(1)
    products = cost["heavy"].products(None)  # excluded: every product at 32 bits
    assert heavy.path == "fp32" and heavy.runs_on == ("fp32",) * 3
    assert heavy.as_run_s == pytest.approx(sum(scaled.latency_s(p[1], p[4], p[2], p[3]) for p in products))


def test_each_op_gets_its_own_time_forward_and_backward():
    q, x = _model()
    st = bench(q, target="epyc9655", stages=[-1], repeats=3, warmup=1).stages[0]
    ops = {o.op: o for o in st.ops}
    # 8192x the MACs: attribution to the wrong op could not keep this order
    assert ops["heavy"].forward_s > ops["light"].forward_s
    assert ops["heavy"].backward_s > ops["light"].backward_s > 0
    assert all(o.forward_s > 0 and o.backward_s is not None for o in st.ops)
    assert st.step_spread[0] <= st.step_s <= st.step_spread[1]


def test_bench_leaves_the_model_as_it_was():
    q, x = _model()
    fracpass.set_stage(q, 1)
    q(x).sum().backward()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in q.named_parameters()}
    rng = torch.get_rng_state()
    bench(q, target="epyc9655", stages=[0, 3], repeats=1, warmup=0)
    assert fracpass.current_stage(q) == 1
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p.grad, grads[n]) for n, p in q.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_gated_models_and_keyword_inputs_bench():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + torch.relu(self.conv(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.Sequential(Block(), Block())
            self.fc = nn.Linear(8, 4)

        def forward(self, image, scale=1.0):
            return self.fc(self.blocks(self.stem(image) * scale).mean((2, 3)))

    x = torch.randn(4, 3, 8, 8)
    q = fracpass.transform(Net(), fracpass.Plan.fractrain("cifar"), example_kwargs={"image": x})
    report = bench(q, target="epyc9655", stages=[0], repeats=1, warmup=0)
    ops = {o.op: o for o in report.stages[0].ops}
    cost = fracpass.cost(q, stage=0)
    gated = [o.op for o in cost.ops if o.gated]
    assert len(gated) == 2 and set(ops) == {o.op for o in cost.ops}
    assert all(ops[g].path == "simulated" and ops[g].backward_s is not None for g in gated)
    assert all(o.forward_s > 0 for o in ops.values())


def test_a_model_captured_with_torch_export_benches():
    """A buffer updated in forward sends capture down the torch.export path, whose graph takes its
    inputs flattened; the per-op run feeds them as the cost pass does."""
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x, scale=1.0):
            self.calls += 1
            return self.fc(x) * scale

    q = fracpass.transform(Counting(), fracpass.Plan.static(), example_kwargs={"x": torch.randn(4, 8)})
    assert "captured with export" in fracpass.summary(q)
    (op,) = bench(q, repeats=1, warmup=0).stages[0].ops
    assert op.forward_s > 0 and op.backward_s is not None


def test_attention_products_of_three_operands_are_costed_and_timed():
    from fracpass.models import TransformerClassifier

    torch.manual_seed(0)
    model = TransformerClassifier(vocab=50, dim=32, heads=4, depth=1, mlp=64, max_len=16, dropout=0.0)
    x = torch.randint(0, 50, (4, 16))
    q = fracpass.transform(model, fracpass.Plan.static(), example_inputs=(x,), execution="native")
    st = bench(q, target="epyc9655", repeats=1, warmup=0).stages[0]
    sdpa = [o for o in st.ops if o.kind == "sdpa"]
    assert sdpa and all(o.runs_on == ("fp32",) * 4 and o.path == "simulated" for o in sdpa)
    assert all(o.as_run_s >= o.at_bits_s > 0 for o in sdpa)


def test_bad_requests_say_what_to_do():
    q, x = _model()
    with pytest.raises(TargetError, match=r"'bitfusion'.*not a cpu profile with a core count.*built-in: epyc9655, "
                                          r"xeon8380"):
        bench(q, target="bitfusion")
    with pytest.raises(FracpassError, match=r"stages \[4\] do not exist; the plan has 4 stage\(s\)"):
        bench(q, stages=[4])
    with pytest.raises(FracpassError, match=r"repeats=0"):
        bench(q, repeats=0)

    class NoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).argmax(1)

    q2 = fracpass.transform(NoGrad(), fracpass.Plan.static(), example_inputs=(torch.randn(2, 4),))
    with pytest.raises(FracpassError, match=r"no floating tensor that needs a gradient.*loss_fn="):
        bench(q2, repeats=1, warmup=0)


def test_profiles_give_their_cores_and_scale_every_rate():
    epyc = load_target("epyc9655")
    assert epyc.cores == 96 and [p.name for p in epyc.precisions] == ["int8-vnni", "bf16", "fp32"]
    # Zen 5 at 2.6 GHz: 32 fp32, 64 bf16, 128 int8 MACs per cycle per core
    assert [p.macs_per_s / (96 * 2.6e9) for p in epyc.precisions] == pytest.approx([128, 64, 32], rel=1e-3)
    two = epyc.per_cores(2)
    assert two.bandwidth_bytes_per_s == pytest.approx(epyc.bandwidth_bytes_per_s / 48)
    assert two.rate(16, 16).macs_per_s == pytest.approx(epyc.rate(16, 16).macs_per_s / 48)
    assert load_target("xeon8380").cores == 40


def test_cli_bench_prints_the_table_and_json(tmp_path):
    cmd = [sys.executable, "-m", "fracpass", "bench", "--model", "examples.models:resnet20", "--input-shape",
           "4,3,32,32", "--stages", "0", "--repeats", "1", "--threads", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "stage 0 (8/8/8)" in done.stdout and "layer3_2_conv2" in done.stdout and "measured / as run" in done.stdout
    assert "stage 0: step" in done.stderr  # progress
    done = subprocess.run(cmd + ["--json", "--execution", "native", "--reuse-large-blocks"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("not applied" in done.stderr) == (platform.libc_ver()[0] != "glibc"), done.stderr
    data = json.loads(done.stdout)
    assert data["execution"] == "native" and data["threads"] == 1 and len(data["stages"][0]["ops"]) == 22  # 19 + 2 downsample convs + fc
    done = subprocess.run(cmd[:-2] + ["--threads", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--threads 0: give a positive number" in done.stderr


def test_each_stage_is_timed_against_an_interleaved_fp32_baseline():
    """The baseline is the same graph with every quantizer passing through: the FP32 model's own values."""
    from fracpass.bench import _fp32_baseline

    torch.manual_seed(0)
    model, x = Uneven(), torch.randn(64, 1024)
    q = fracpass.transform(model, fracpass.Plan.static(4, 4, 4), example_inputs=(x,))
    baseline = _fp32_baseline(q)
    assert torch.equal(baseline(x), model(x)) and not torch.equal(q(x), model(x))
    assert all(m.bits == 4 for _, m in fracpass.quantizers(q))  # the user's model keeps its bits
    report = bench(q, target="epyc9655", repeats=3, warmup=1)
    st = report.stages[0]
    assert st.fp32_step_s > 0
    assert f"{st.step_s / st.fp32_step_s:.2f}x the FP32 baseline's" in str(report)


def test_the_report_says_why_each_simulated_op_is_simulated(monkeypatch):
    """ResNet-20's convolutions under NativeOptions.min_conv_macs run simulated: the report says so (the
    README's example printed 'simulated' with no reason)."""
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "avx512_vnni"}))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    q = fracpass.transform(fracpass.models.resnet20(), fracpass.Plan.static(8, 8, 8, exclude=("conv1", "fc")),
                           example_inputs=(x,), execution="native")
    q(x)  # op_paths gives the size-dependent reason of an op's last call
    report = bench(q, target="epyc9655", repeats=1, warmup=0)
    text = str(report)
    why = native.op_paths(q)["layer1_0_conv1"]
    assert why[0] == "simulated" and "min_conv_macs" in why[1], why
    line = next(line for line in text.splitlines() if line.startswith("simulated (") and why[1] in line)
    assert "layer1_0_conv1" in line and "layer3_2_conv2" in line
