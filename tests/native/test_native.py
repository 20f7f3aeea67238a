"""Native execution (fracpass.native): int8 products must compute what the simulation computes.

Exact int8 paths are compared with the simulated model on the same weights, inputs and seed
(the gradient quantizer's stochastic rounding draws the same noise): forward output, input
gradient and weight gradient within 1e-5 of the simulated tensor's range (float32 rounding of the
two summation orders). Fallbacks must give the simulated result bit for bit.
"""
from __future__ import annotations

import ast
import copy
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import fracpass
import fracpass.memory
from fracpass import native
from fracpass.errors import FracpassError

TOL = 1e-5  # of the simulated tensor's range


# These tests use small operands, which the int8 and bf16 paths normally leave to the simulation as not
# worth it (NativeOptions.min_intensity, min_conv_macs); they check their arithmetic, so they run at every size.
# channels_last=False: each test's layout as given (test_layout.py checks the default conversion); transposed
# convolutions lowered too (opt-in by default: test_found_by_users.py checks the default)
OPTS = fracpass.NativeOptions(kinds=fracpass.native.DEFAULT_KINDS + ("conv_transpose",), min_intensity=0.0, min_conv_macs=0, channels_last=False)
# tests that expect ops on int8 or bf16: without the units (an AVX2-only CPU) they run simulated
needs_units = pytest.mark.skipif(native.int8_support() is not None or native.bf16_support() is not None,
                                 reason="this CPU lacks int8 or bf16 dot-product instructions: native runs simulated")


class Lin(nn.Module):
    def __init__(self, k=48, n=40):
        super().__init__()
        self.fc = nn.Linear(k, n)

    def forward(self, x):
        return self.fc(x)


class ActMatmul(nn.Module):  # both operands activations (attention-like), right one 2-D
    def forward(self, a, b):
        return torch.matmul(a, b)


class WeightMatmul(nn.Module):  # a parameter on the right: per-column (free axis) weight scale
    def __init__(self, k=24, n=20):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, n) * 0.2)

    def forward(self, x):
        return x @ self.w


class Conv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Conv2d(nn.Module):
    def __init__(self, cin=6, cout=8, k=3, stride=1, padding=1, dilation=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups)

    def forward(self, x):
        return self.conv(x)


def _run(qmodel, inputs, seed=123):
    """Output, input gradients and parameter gradients for loss = <y, r> with a fixed r."""
    qmodel.zero_grad(set_to_none=True)
    inputs = [t.clone().requires_grad_() for t in inputs]
    y = qmodel(*inputs)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(seed)  # the gradient quantizers' noise
    (y * r).sum().backward()
    return [y.detach()] + [t.grad for t in inputs] + [p.grad for p in qmodel.parameters()]


def _pair(model, plan, inputs, opts=OPTS):
    sim = fracpass.transform(model, plan, example_inputs=inputs)
    nat = fracpass.transform(model, plan, example_inputs=inputs, execution="native", native=opts)
    return sim, nat


def _assert_close(got, want, what, model=None, bits=8):
    """Each tensor within float32 rounding (TOL of its range); with ``model``, a linear layer or matmul whose
    weight has a per-channel scale, its input gradient (tensor 1) within the bound of g x w on bf16 over the
    folded weight instead (``_folded_dx_bound``)."""
    folded = _per_channel_weight(model)
    for i, (g, w) in enumerate(zip(got, want)):
        span = float(w.max() - w.min()) or 1.0
        err = (g - w).abs()
        if i == 1 and folded is not None:
            bound = _folded_dx_bound(folded, w, want[0].shape, bits)
            assert bool((err <= bound).all()), f"{what}: dx exceeds the folded g x w bound by {float((err / bound).max()):.3g}x"
            continue
        err = float(err.max())
        assert err <= TOL * span, f"{what}: tensor {i} differs by {err:.3g} ({err / span:.2g} of its range {span:.3g})"


def _per_channel_weight(model):
    """The per-channel-scaled weight of a Lin or WeightMatmul as (K, N) (its input's axis first), or None."""
    if isinstance(model, Lin):
        return model.fc.weight.detach().t()
    if isinstance(model, WeightMatmul):
        return model.w.detach()
    return None


def _folded_dx_bound(w_kn, dx, y_shape, bits):
    """Per element of dx: u |dx| + (u max|g| + u (1 + u) (max g - min g) / 2) sum_n |w[k, n]| (docs/native.md,
    tests/native/test_folded_weights.py), |w| padded by a quantization step, g = dL/dy of _run, plus TOL of
    dx's range for float32."""
    u = 2.0**-8
    r = torch.randn(y_shape, generator=torch.Generator().manual_seed(7))  # dL/dy in _run
    half = float(r.max() - r.min()) / 2 * 2**bits / (2**bits - 1)
    wa = w_kn.abs() + float(w_kn.abs().max()) / (2**bits - 1)
    return u * dx.abs() + (u * float(r.abs().max()) + u * (1 + u) * half) * wa.sum(1) + TOL * float(dx.max() - dx.min())


def _count_int_mm(monkeypatch):
    calls = []
    real = torch._int_mm

    def counting(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    monkeypatch.setattr(torch, "_int_mm", counting)
    return calls


def _assert_simulated_exactly(sim, nat, inputs, monkeypatch):
    """nat runs no int8 product and gives sim's output and gradients bit for bit; returns the list
    that keeps counting int8 products."""
    calls = _count_int_mm(monkeypatch)
    want, got = _run(sim, inputs), _run(nat, inputs)
    assert not calls
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    return calls

CASES = {
    "conv2d 3x3 pad 1, x offset": (Conv2d, lambda: (torch.rand(3, 6, 9, 9) * 3 - 0.5,)),
    "conv2d stride 2 no pad": (lambda: Conv2d(stride=2, padding=0), lambda: (torch.randn(2, 6, 9, 9),)),
    "conv2d grouped dilated, x >= 0": (lambda: Conv2d(cin=6, cout=9, groups=3, dilation=2, padding=2),
                                       lambda: (torch.rand(2, 6, 8, 8),)),
    "conv2d depthwise": (lambda: Conv2d(cin=6, cout=6, groups=6), lambda: (torch.randn(2, 6, 7, 7),)),
    "conv2d channels_last input": (Conv2d, lambda: (
        torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last),)),
    # name: (model factory, inputs) -- inputs chosen so that 8-bit codes are asymmetric (zero point != 128)
    "linear 2-D": (Lin, lambda: (torch.randn(32, 48),)),
    "linear 3-D, x >= 0": (Lin, lambda: (torch.rand(4, 8, 48) * 3,)),
    "linear offset range": (Lin, lambda: (torch.rand(16, 48) * 4 - 1,)),
    "matmul act x act": (ActMatmul, lambda: (torch.randn(3, 10, 24), torch.rand(24, 16) * 2 - 0.5)),
    "matmul act x weight": (WeightMatmul, lambda: (torch.randn(2, 12, 24).abs(),)),
}


@pytest.fixture(params=["fused", "torch ops", "cuda route"])
def kernels(request, monkeypatch):
    """Both implementations of the codes and the epilogue, csrc/native_*.cpp and the torch-op path, and
    the route CUDA tensors take: the CPU tensors routed as CUDA ones on an Ampere GPU (int8 and bf16, no
    FP8), where calling a CPU kernel fails the test. torch._int_mm's CUDA shape limits are lifted here
    (tests/native/test_cuda.py checks them), so that the route runs these tests' shapes."""
    if request.param == "torch ops":
        monkeypatch.setattr(native.units, "ext", lambda t=None: None)
    elif request.param == "cuda route":
        monkeypatch.setattr(native.units, "device_kind", lambda d: "cuda")
        monkeypatch.setattr(native.units, "_cuda_capability", lambda d: (8, 0))
        monkeypatch.setattr(native.decide, "_cuda_mm_reason", lambda *a: None)

        def no_cpu_kernels():
            raise AssertionError("the CUDA route called a CPU kernel")

        monkeypatch.setattr(native.units, "_cpu_ext", no_cpu_kernels)
    elif native.units.ext() is None:
        pytest.skip("the fused native kernels could not be built here")
    return request.param


@needs_units
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_int8_path_matches_simulation(case, bits, kernels, monkeypatch):
    if case.startswith("conv2d") and kernels == "cuda route":
        pytest.skip("oneDNN's int8 convolution (native_conv2d) is a CPU op: CUDA tensors run it simulated")
    factory, make = CASES[case]
    torch.manual_seed(0)
    model, inputs = factory(), make()
    sim, nat = _pair(model, fracpass.Plan.static(w=bits, a=bits, g=bits), inputs, OPTS.replace(kinds=native.KINDS))  # conv2d's int8 forward is opt-in
    calls = _count_int_mm(monkeypatch)
    convs = []
    real_conv = native.int8_conv2d.int8_conv2d  # the op, fracpass::int8_conv2d
    monkeypatch.setattr(native.int8_conv2d, "int8_conv2d", lambda *a: convs.append(1) or real_conv(*a))
    want = _run(sim, inputs)
    assert not calls and not convs
    got = _run(nat, inputs)
    # linear/matmul: forward and weight gradient always on int8 (g x w too when no per-channel weight is
    # contracted); conv2d: the forward on oneDNN's int8 convolution
    if case.startswith("conv2d"):
        assert convs == [1], f"{case}: the int8 convolution did not run"
    else:
        assert len(calls) >= 2, f"{case}: the int8 path did not run ({calls})"
    _assert_close(got, want, f"{case} at {bits} bits", model, bits)
    assert all(p == "int8" for p, _ in native.op_paths(nat).values())


@needs_units
def test_int8_input_gradient_is_int8_when_no_channel_axis_is_contracted(kernels, monkeypatch):
    torch.manual_seed(0)
    inputs = (torch.randn(3, 10, 24), torch.randn(24, 16))
    _, nat = _pair(ActMatmul(), fracpass.Plan.static(8, 8, 8), inputs)
    calls = _count_int_mm(monkeypatch)
    _run(nat, inputs)
    assert len(calls) == 3  # forward, dA, dB
    path, note = native.op_paths(nat)["matmul"]
    assert (path, note) == ("int8", "")


PER_TENSOR = {
    "linear 3-D": (Lin, lambda: (torch.rand(4, 8, 48) * 3 - 1,)),
    "matmul act x weight": (WeightMatmul, lambda: (torch.randn(2, 12, 24),)),
}


@needs_units
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("case", sorted(PER_TENSOR))
def test_per_tensor_weights_run_all_three_products_on_int8(case, bits, kernels, monkeypatch):
    """A plan rule weight_scale="tensor" gives each weight one scale, so the input gradient (g x w,
    contracted over the weight's output channels) goes on int8 too, and still equals the simulation."""
    factory, make = PER_TENSOR[case]
    torch.manual_seed(0)
    model, inputs = factory(), make()
    plan = fracpass.Plan.static(w=bits, a=bits, g=bits, rules=[fracpass.Rule(weight_scale="tensor")])
    sim, nat = _pair(model, plan, inputs)
    assert all(q.axis is None for name, q in fracpass.quantizers(sim) if name.endswith("_wq"))
    calls = _count_int_mm(monkeypatch)
    want = _run(sim, inputs)
    assert not calls
    got = _run(nat, inputs)
    assert len(calls) == 3, calls  # forward, g x w, g x a
    _assert_close(got, want, f"{case}, per-tensor weights at {bits} bits")
    assert [p for p, _ in native.op_paths(nat).values()] == ["int8"]
    assert list(native.product_paths(nat).values()) == [("int8", "int8", "int8")]


@needs_units
@pytest.mark.parametrize("weight_scale", ["tensor", "channel"])
def test_gradient_values_are_written_only_for_a_float32_backward_product(weight_scale, monkeypatch):
    """The gradient's float values ghat are written only where a backward product reads them. With
    per-tensor weights both products run on int8 from the codes, and the bias gradient comes from the
    codes' column sums (s sum(t) + rows c in float64, the sum of ghat's values without their float32
    roundings) instead of a pass summing ghat (on the d512 transformer, ghat's writes and the sums' reads
    were ~600 MB a step); with per-channel weights g x w runs on bf16 over the folded weight from the codes
    too (on a CPU with int8 units only it runs in float32 on ghat, which is then written)."""
    if native.units.ext() is None:
        pytest.skip("the fused native kernels could not be built here")
    torch.manual_seed(0)
    model, inputs = Lin(), (torch.rand(4, 8, 48) * 3 - 1,)
    plan = fracpass.Plan.static(w=6, a=6, g=6, rules=[fracpass.Rule(weight_scale=weight_scale)])
    sim, nat = _pair(model, plan, inputs)
    ext, asked = native.units.ext(), []

    class Spy:  # the kernels, recording grad_codes's last argument (values)
        def __getattr__(self, name):
            f = getattr(ext, name)
            return f if name != "grad_codes" else lambda *a: (asked.append(a[-1]), f(*a))[1]

    monkeypatch.setattr(native.units, "ext", lambda t=None: Spy())
    want, got = _run(sim, inputs), _run(nat, inputs)
    assert asked == [weight_scale == "channel" and native.bf16_support() is not None]
    _assert_close(got, want, f"{weight_scale} weight scales", model if weight_scale == "channel" else None, 6)


def test_grad_codes_without_values_writes_the_same_codes_and_sums():
    ext = native.units.ext()
    if ext is None:
        pytest.skip("the fused native kernels could not be built here")
    g = torch.randn(300, 77) * 1e-3
    g[5, 7] = 0.02  # a range not centred on zero
    mn, mx = torch.aminmax(g)
    with_values = ext.grad_codes(g, mn, mx, 63.0, 1234, True)
    alone = ext.grad_codes(g, mn, mx, 63.0, 1234, False)
    assert alone[0].numel() == 0 and with_values[0].shape == g.shape
    assert all(torch.equal(a, b) for a, b in zip(alone[1:], with_values[1:]))
    # the column sums give the sum of ghat over the rows to ghat's float32 roundings (q s and + mn: each
    # at most half an ulp of the largest |ghat|, 2 per element)
    s = (mx / 63 - mn / 63).double()
    from_codes = alone[3].double() * s + 300 * (mn.double() + 32 * s)
    bound = 300 * float(with_values[0].abs().max()) * 2.0**-23
    assert float((from_codes - with_values[0].double().sum(0)).abs().max()) <= bound


@needs_units
def test_gradient_above_8_bits_runs_backward_in_fp32_and_matches(monkeypatch):
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    sim, nat = _pair(Lin(), fracpass.Plan.static(8, 8, 12), inputs)
    calls = _count_int_mm(monkeypatch)
    want, got = _run(sim, inputs), _run(nat, inputs)
    assert len(calls) == 1  # forward only
    _assert_close(got, want, "8/8/12")
    assert "gradient at 12 bits" in native.op_paths(nat)["fc"][1]


@pytest.mark.parametrize("bits", [9, 12, 16])
def test_bits_above_8_fall_back_to_the_simulation_exactly(bits, monkeypatch):
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    sim, nat = _pair(Lin(), fracpass.Plan.static(bits, bits, 8), inputs)
    _assert_simulated_exactly(sim, nat, inputs, monkeypatch)
    path, why = native.op_paths(nat)["fc"]
    assert path == "simulated" and f"{bits} bits" in why


def test_cpu_without_int8_instructions_falls_back_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    monkeypatch.setattr(native.units, "_warned", set())
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    sim, nat = _pair(Lin(), fracpass.Plan.static(8, 8, 8), inputs)
    with caplog.at_level("WARNING", logger="fracpass.native"):
        calls = _assert_simulated_exactly(sim, nat, inputs, monkeypatch)
        _run(nat, inputs)  # a second call warns no more
    assert not calls
    assert sum("no int8 dot-product instructions" in r.getMessage() for r in caplog.records) == 1
    path, why = native.op_paths(nat)["fc"]
    assert path == "simulated" and "avx512_vnni" in why


class EinsumFc(nn.Module):  # a batched product written as einsum (no native path) feeding a linear
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 6, 5)

    def forward(self, a, b):
        return self.fc(torch.einsum("bij,bjk->bik", a, b).flatten(1))


@needs_units
def test_unsupported_op_stays_simulated_and_coverage_says_why():
    torch.manual_seed(0)
    inputs = (torch.randn(3, 4, 8), torch.randn(3, 8, 6))
    sim, nat = _pair(EinsumFc(), fracpass.Plan.static(8, 8, 8), inputs)
    want, got = _run(sim, inputs), _run(nat, inputs)
    _assert_close(got[:1] + got[3:], want[:1] + want[3:], "einsum + linear")  # output, parameters' gradients: int8
    # the inputs' gradients flow back through fc's g x w: on bf16 over its per-channel weight, within a few units
    # of bfloat16 rounding (2^-8) of their largest magnitude
    for g, w in zip(got[1:3], want[1:3]):
        assert float((g - w).abs().max()) <= 2.0**-6 * float(w.abs().max())
    paths = native.op_paths(nat)
    assert paths["einsum"] == ("simulated", "no native path for einsum yet (linear, matmul, bmm and convolutions "
                                            "have one)")
    assert paths["fc"][0] == "int8"
    text = str(fracpass.coverage(nat))
    assert "path einsum: simulated: no native path for einsum" in text and "path fc: int8" in text
    assert "path " not in str(fracpass.coverage(sim))  # a simulated model's report is unchanged


@needs_units
def test_stage_switch_moves_ops_between_paths_without_retrace(monkeypatch):
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    # per-tensor weights: every product on int8, within float32 rounding (per-channel ones put g x w on bf16)
    plan = fracpass.Plan.progressive(fw=(4, 12, 8), bw=(6, 16, 8), rules=[fracpass.Rule(weight_scale="tensor")])
    sim, nat = _pair(Lin(), plan, inputs)
    graph = nat.graph
    for stage, expected in ((0, "int8"), (1, "simulated"), (2, "int8")):
        fracpass.set_stage(sim, stage)
        fracpass.set_stage(nat, stage)
        calls = _count_int_mm(monkeypatch)
        want, got = _run(sim, inputs), _run(nat, inputs)
        _assert_close(got, want, f"stage {stage}")
        assert native.op_paths(nat)["fc"][0] == expected
        assert bool(calls) == (expected == "int8")
        assert nat.graph is graph


@needs_units
def test_eval_mode_uses_the_running_range_like_the_simulation(kernels):
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    sim, nat = _pair(Lin(), fracpass.Plan.static(8, 8, 8), inputs)
    _run(sim, inputs), _run(nat, inputs)  # one training batch: EMA ranges
    sim.eval(), nat.eval()
    x = torch.randn(8, 48) * 2  # partly outside the running range: clamping must agree
    with torch.no_grad():
        _assert_close([nat(x)], [sim(x)], "eval")
    assert native.op_paths(nat)["fc"][0] == "int8"


def _saved_dtypes(qmodel, x):
    """The dtypes of the tensors of x's size that autograd saves over qmodel(x)'s forward and backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        qmodel(x).sum().backward()
    return [t.dtype for t in saved if t.numel() == x.numel()]


@needs_units
def test_saved_operands_stay_int8(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(64, 48, requires_grad=True)
    _, nat = _pair(Lin(), fracpass.Plan.static(8, 8, 8), (x.detach(),))
    big = _saved_dtypes(nat, x)
    assert big and all(d == torch.int8 for d in big), big


def test_lower_native_pass_contract():
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    nat = fracpass.transform(Lin(), fracpass.Plan.static(8, 8, 8), example_inputs=inputs, execution="native", native=OPTS)
    assert nat.fracpass.stats[True]["lower-native"] == {"lowered": 1, "simulated": 0}
    again = fracpass.passes.LowerNativePass(OPTS)(nat)
    assert again.modified is False and again.stats == {"lowered": 0, "simulated": 0}
    text = nat.code
    assert "native_linear" in text and "fc_aq" in text and "F.linear" not in text
    roles = {n.name: fracpass.meta.inserted(n).role for n in nat.graph.nodes if fracpass.meta.inserted(n)}
    assert roles == {"fc_aq": "act", "fc_wq": "weight", "fc_gq": "grad"}


def test_bad_execution_is_refused():
    with pytest.raises(FracpassError, match="execution='fast' is not one of"):
        fracpass.transform(Lin(), fracpass.Plan.static(), example_inputs=(torch.randn(2, 48),), execution="fast")


def test_state_dict_deepcopy_pickle_and_cost_as_for_simulated():
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    sim, nat = _pair(Lin(), fracpass.Plan.static(8, 8, 8), inputs)
    _run(sim, inputs)
    assert list(sim.state_dict()) == list(nat.state_dict())
    nat.load_state_dict(sim.state_dict())
    for key, value in sim.state_dict().items():
        assert torch.equal(nat.state_dict()[key], value), key
    want = _run(nat, inputs)
    for clone in (copy.deepcopy(nat), pickle.loads(pickle.dumps(nat))):
        assert clone.fracpass.execution == "native" and "native_linear" in clone.code
        _assert_close(_run(clone, inputs), want, "copy")
    assert [(o.op, o.forward_macs) for o in fracpass.cost(nat).ops] == [(o.op, o.forward_macs)
                                                                       for o in fracpass.cost(sim).ops]


def test_onnx_export_is_identical(tmp_path):
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    sim, nat = _pair(Lin(), fracpass.Plan.static(8, 8, 8), inputs)
    nat.load_state_dict(sim.state_dict())
    _run(sim, inputs), _run(nat, inputs)  # a training batch: EMA ranges for export
    a = fracpass.export_onnx(sim, tmp_path / "sim.onnx", inputs)
    b = fracpass.export_onnx(nat, tmp_path / "nat.onnx", inputs)
    assert a.SerializeToString() == b.SerializeToString()


@needs_units
def test_batched_product_falls_back_and_reports_the_last_calls_reason(monkeypatch):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 4, 10, 8), torch.randn(2, 4, 8, 10))  # attention scores: both operands batched
    sim, nat = _pair(ActMatmul(), fracpass.Plan.static(8, 8, 8), inputs)
    assert native.op_paths(nat)["matmul"] == ("int8", "")  # the bits allow it; no call seen yet
    _assert_simulated_exactly(sim, nat, inputs, monkeypatch)
    path, why = native.op_paths(nat)["matmul"]  # 10x8x10 per head: too small for bf16 (tests/native/test_bf16_mm.py)
    assert path == "simulated" and why.startswith("at the last call: a small batched product (10x8x10")


@needs_units
def test_convolutions_run_on_bf16_by_default_and_conv2d_int8_is_opt_in():
    torch.manual_seed(0)
    inputs = (torch.randn(2, 6, 8, 8),)
    nat = fracpass.transform(Conv2d(), fracpass.Plan.static(8, 8, 8), example_inputs=inputs, execution="native", native=OPTS)
    assert "bf16_conv2d" in nat.code
    assert native.op_paths(nat)["conv"][0] == "bf16"
    nat = fracpass.transform(Conv2d(), fracpass.Plan.static(8, 8, 8), example_inputs=inputs, execution="native",
                             native=OPTS.replace(kinds=native.KINDS))
    assert nat.fracpass.stats[True]["lower-native"] == {"lowered": 1, "simulated": 0}
    path, note = native.op_paths(nat)["conv"]
    assert path == "int8" and note.startswith("forward only")
    assert "native_conv2d" in nat.code and "bf16_conv2d" not in nat.code
    again = fracpass.NativeOptions(kinds=("linear", "conv2d"))  # the int8 kind's earlier name
    assert again.kinds == ("linear", "conv2d_int8")
    with pytest.raises(FracpassError, match=r"no native path for \['conv3d'\]"):
        fracpass.NativeOptions(kinds=("linear", "conv3d"))
    off = fracpass.transform(Conv2d(), fracpass.Plan.static(8, 8, 8), example_inputs=inputs)
    fracpass.passes.LowerNativePass(fracpass.NativeOptions(kinds=("linear", "matmul")))(off)
    assert "not lowered" in off.graph.find_nodes(op="call_function", target=torch.nn.functional.conv2d)[0].meta[
        native.NATIVE].reason


@needs_units
def test_summary_shows_each_ops_path_at_the_current_stage():
    from fracpass.models import transformer

    x = torch.randint(0, 100, (2, 16))
    qmodel = fracpass.transform(transformer(), fracpass.Plan.progressive(fw=(4, 12), bw=(8, 8)), example_inputs=(x,),
                                execution="native", native=OPTS)
    qmodel(x)
    text = fracpass.summary(qmodel)
    header = next(line for line in text.splitlines() if line.startswith("op "))
    assert header.split()[-1] == "path"
    assert re.search(r"^head +linear .* int8$", text, re.M)
    assert re.search(r"^ +path of scaled_dot_product_attention: simulated: sdpa: only its inputs are quantized", text, re.M)
    fracpass.set_stage(qmodel, 1)  # 12 bits: beyond int8, every op simulated
    assert re.search(r"^head +linear .* simulated$", fracpass.summary(qmodel), re.M)
    simulated = fracpass.transform(transformer(), fracpass.Plan.static(), example_inputs=(x,))
    assert "path" not in next(line for line in fracpass.summary(simulated).splitlines() if line.startswith("op "))


@pytest.mark.slow  # 50 digits trainings of 12 epochs: ~2 min on 2 cores
def test_digits_pfq_trains_as_accurately_native_as_simulated(monkeypatch):
    """Issue 11: examples/digits_pfq.py's setup, native (the linear on int8, the convs on bf16) against
    simulated: the mean test accuracies within 0.5 pp. Seeds 0-9, not 3: one seed's accuracy spreads
    ~0.7 pp here (360 test images, 0.28 pp each), so the difference of two 3-seed means has a ~0.5 pp
    standard deviation by itself (seeds 0-2 measured 98.61 % native vs 99.26 % simulated; 0-9
    98.97 % vs 99.08 %). Native in channels_last too, where the fused convolutions' BatchNorm runs on
    fracpass's own kernels instead of aten's and conv3's forward and weight gradient on int8; and with
    per-tensor weights (against simulated per-tensor), where conv3's input gradient runs on int8 too."""
    pytest.importorskip("sklearn")
    if native.int8_support() is not None or native.bf16_support() is not None:
        pytest.skip("this CPU lacks int8 or bf16 dot-product instructions: native would run simulated")
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from examples.digits_pfq import DigitsCNN, run

    # what run(execution="native", native=OPTS) trains on: conv2 and conv3 on bf16, fc on int8 (conv1 is excluded)
    q = fracpass.transform(DigitsCNN(), fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8), exclude=("conv1",)),
                           example_inputs=(torch.randn(2, 1, 8, 8),), execution="native", native=OPTS)
    fracpass.set_stage(q, 3)
    q(torch.randn(4, 1, 8, 8))
    paths = {op: p for op, (p, _) in native.op_paths(q).items()}
    assert paths == {"conv1": "simulated", "conv2": "bf16", "conv3": "bf16", "fc": "int8"}

    acc = {"simulate": [], "native": [], "native channels_last": [], "simulate per-tensor": [],
           "native channels_last per-tensor": []}
    products = []
    spy = native.int8_conv.int8_input_grad
    monkeypatch.setattr(native.int8_conv, "int8_input_grad", lambda *a: products.append(1) or spy(*a))
    for seed in range(10):
        for name in acc:
            accuracy, sched, _ = run(seed=seed, log=lambda line: None, execution=name.split()[0], native=OPTS,
                                     channels_last="channels_last" in name,
                                     weight_scale="tensor" if name.endswith("per-tensor") else "channel")
            assert sched.stage == 3  # every run climbed the whole ladder
            acc[name].append(accuracy)
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    assert abs(mean["native"] - mean["simulate"]) <= 0.005, acc
    assert abs(mean["native channels_last"] - mean["simulate"]) <= 0.005, acc
    assert abs(mean["native channels_last per-tensor"] - mean["simulate per-tensor"]) <= 0.005, acc
    assert min(mean.values()) >= 0.9, acc  # all learned (chance is 0.1)
    assert len(products) > 1000  # conv3's input gradient ran on int8 (once a step of the per-tensor runs)
    q = q.to(memory_format=torch.channels_last)  # the BatchNorm's kernels took the channels_last runs
    q(torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last))
    assert native.op_paths(q)["conv3"][1].endswith("BatchNorm fused, on the CPU kernels")


@needs_units
def test_products_too_small_for_int8_to_pay_stay_simulated_and_say_why(monkeypatch):
    default = fracpass.NativeOptions()  # min_intensity=50
    torch.manual_seed(0)
    small = (torch.randn(32, 48),)  # 32x48x40: 13 multiply-adds per element
    sim, nat = _pair(Lin(), fracpass.Plan.static(8, 8, 8), small, default)
    _assert_simulated_exactly(sim, nat, small, monkeypatch)
    path, why = native.op_paths(nat)["fc"]
    assert path == "simulated" and "at the last call: a small product (32x48x40: 13 multiply-adds per operand or output element" in why
    big = (torch.randn(256, 512),)  # 256x512x512: 102 per element
    _, nat = _pair(Lin(512, 512), fracpass.Plan.static(8, 8, 8), big, default)
    calls = _count_int_mm(monkeypatch)
    _run(nat, big)
    assert len(calls) == 2 and native.op_paths(nat)["fc"][0] == "int8"


@needs_units
def test_per_channel_weights_say_how_to_put_g_x_w_on_int8():
    """With bfloat16 units g x w runs on bf16 over the folded weight (tests/native/test_folded_weights.py
    checks its bound, and fp32 on a CPU with int8 units only); the note says how to put it on int8."""
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    _, nat = _pair(Lin(), fracpass.Plan.static(8, 8, 8), inputs)
    _run(nat, inputs)
    path, note = native.op_paths(nat)["fc"]
    assert path == "int8" and "g x w on bf16" in note and "weight_scale='tensor'" in note
    assert native.product_paths(nat)["fc"] == ("int8", "bf16", "int8")
    assert "weight_scale='tensor'" in fracpass.summary(nat)


_BLOCK_FAULTS = """
import resource, torch, fracpass.memory as n
def faults(f):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
def step():  # three blocks alive at once, each over glibc's largest mmap threshold (32 MB)
    blocks = [torch.empty(40 << 20, dtype=torch.uint8).fill_(1) for _ in range(3)]
    del blocks
before = [faults(step) for _ in range(3)]
why = n.reuse_large_blocks()
after = [faults(step) for _ in range(8)]
print(repr((why, before, after)))
"""


def test_reuse_large_blocks_keeps_freed_blocks_for_the_next_step():
    """Steps of three 40 MB blocks fault every page in afresh (glibc unmaps each block on free); after
    reuse_large_blocks() the heap grows to hold a step's blocks within a step or two (glibc's aligned
    allocations do not always fit the block just freed: 0-2 blocks' pages fault in the first steps, by
    process) and then faults nothing. In a child process: the setting is process-wide."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", _BLOCK_FAULTS], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    why, before, after = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    if why is not None:
        pytest.skip(f"not applied here: {why}")
    assert min(before) > 30, before  # every block faulted its pages in (4 KB or 2 MB pages)
    assert max(after[4:]) <= max(2, min(before) // 100), (before, after)


@pytest.mark.parametrize("limit", [0, -1, 2**31, 1.5, True, "1G"])
def test_reuse_large_blocks_refuses_a_limit_mallopt_cannot_take(limit):
    with pytest.raises(FracpassError, match=r"reuse_large_blocks\(limit=.*a positive int below 2\*\*31"):
        fracpass.memory.reuse_large_blocks(limit)
