"""g x w with per-channel weights (issue 29): the weight's scale lies on that product's contracted axis, so it
is folded into the weight's values, rounded once to bfloat16, and the product runs on bf16 (it ran in
float32 before). The bound, in docs/native.md: |dx - dx_exact| <= u |dx_exact| + u (1 + u) s_g conv^T(|t|, |w|)
beside the product's own rounding, u = 2^-8. Checked per convolution kind, for a linear layer on the int8
path and a gated linear one, at 2..8 bits, on any CPU: the units are claimed (``units._cpu_flags``), so the
native paths run, emulated where this CPU lacks the instructions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native
from test_bf16_conv import BF16_U, CASES, Conv, _assert_within_bf16, _inputs
from test_native import Lin, _pair, _run

UNITS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_int8", "amx_bf16"})
# the bf16 products alone: where this CPU lacks VNNI, oneDNN's int8 convolution sums pairs of u8 x s8 products in
# saturating int16 (wrong at 8-bit activations), so the int8 units' routes are not claimed here (test_int8_conv.py)
EVERY_SIZE = fracpass.NativeOptions(kinds=fracpass.native.DEFAULT_KINDS + ("conv_transpose",), min_conv_macs=0, min_intensity=0.0, min_bmm_intensity=0.0, int8_forward=False,
                                    int8_input_grad=False, int8_weight_grad=False)
CHANNEL = [fracpass.Rule(weight_scale="channel")]


def _real_flags() -> frozenset:
    """This CPU's flags, whatever is claimed (FRACPASS_TEST_CLAIM_UNITS patches units._cpu_flags)."""
    with open("/proc/cpuinfo") as f:
        return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))


@pytest.fixture(autouse=True)
def units_claimed(monkeypatch):
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: UNITS)


def _counting(monkeypatch, module, name):
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_convolutions_input_gradient_with_per_channel_weights_runs_on_bf16_within_the_bound(case, bits, monkeypatch):
    if case == "conv_transpose3d" and not _real_flags().intersection(native.units._BF16_FLAGS):
        # oneDNN's bf16 3-D transposed convolution without bf16 instructions misses the forward's bound at 5, 7 and
        # 8 bits, per-tensor weights too (tests/native/test_bf16_conv.py, units claimed on an AVX2-only EPYC)
        pytest.skip("emulated bf16 conv_transpose3d: its forward exceeds the bf16 bound on this CPU")
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model, inputs = Conv(factory()), _inputs(case, shape)
    plan = fracpass.Plan.static(w=bits, a=bits, g=bits, rules=CHANNEL)
    sim, nat = _pair(model, plan, inputs, EVERY_SIZE)
    folds = _counting(monkeypatch, native.bf16_conv, "folded_weight")
    want, got = _run(sim, inputs), _run(nat, inputs)
    assert folds == [1], f"{case}: dx's product did not take the folded weight"
    _assert_within_bf16(got, want, f"{case} at {bits} bits, per-channel weights", model, inputs, bits, folded=True)
    path, note = native.op_paths(nat)["conv"]
    assert path == "bf16" and "g x w" not in note, note
    assert native.product_paths(nat)["conv"][1] == "bf16"


def test_a_wrong_fold_breaks_the_bound(monkeypatch):
    """The check can fail: a fold that forgets to divide by max(s_w) is far outside the bound."""
    factory, shape = CASES["conv2d 3x3 pad 1"]
    torch.manual_seed(0)
    model, inputs = Conv(factory()), _inputs("conv2d", shape)
    sim, nat = _pair(model, fracpass.Plan.static(8, 8, 8, rules=CHANNEL), inputs, EVERY_SIZE)
    real = native.bf16_conv.folded_weight
    monkeypatch.setattr(native.bf16_conv, "folded_weight", lambda qw, sw, tr: (real(qw, sw, tr)[0], torch.ones(1)))
    with pytest.raises(AssertionError, match="tensor 1 differs"):
        _assert_within_bf16(_run(nat, inputs), _run(sim, inputs), "wrong fold", model, inputs, 8, folded=True)


def _linear_bound(want_dx, weight_hat, r, bits):
    """u |dx| + (u max|c| + u (1 + u) s_g 2^(b-1)) * sum_n |w_hat[n, k]|, per element: the product's rounding
    (of dx minus its offset term c rowsum(w_hat), |c| <= max |g|) and the weights' rounding, with
    s_g 2^(b-1) = (max g - min g) / 2 (the gradient codes |t| <= 2^(b-1)), and 1e-5 of dx's range for float32."""
    g_max = float(r.abs().max())
    half_range = float(r.max() - r.min()) / 2 * (2**bits) / (2**bits - 1)
    per_k = weight_hat.abs().sum(0)  # (K,): sum over the output channels n of |w_hat[n, k]|
    spread = 1e-5 * float(want_dx.abs().max())
    return BF16_U * want_dx.abs() + (BF16_U * g_max + BF16_U * (1 + BF16_U) * half_range) * per_k + spread


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_a_linear_layers_input_gradient_with_per_channel_weights_runs_on_bf16_within_the_bound(bits, monkeypatch):
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    sim, nat = _pair(Lin(), fracpass.Plan.static(bits, bits, bits, rules=CHANNEL), inputs, EVERY_SIZE)
    folds = _counting(monkeypatch, native.int8_mm, "folded_input_grad")
    want, got = _run(sim, inputs), _run(nat, inputs)
    assert folds == [1]
    assert float((got[0] - want[0]).abs().max()) <= 1e-5 * float(want[0].abs().max())  # int8: float32 rounding
    w_hat = dict(fracpass.quantizers(sim))["fc_wq"](sim.fc.weight).detach()
    r = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(7))  # dL/dy in _run
    bound = _linear_bound(want[1], w_hat, r, bits)
    err = (got[1] - want[1]).abs()
    assert bool((err <= bound).all()), f"dx differs by up to {float((err / bound).max()):.3g} of its bound"
    assert float(err.max()) > 0  # bf16 products: not the float32 path's values
    for g, w in zip(got[2:], want[2:]):  # dw and the bias gradient: int8 products, float32 rounding only
        assert float((g - w).abs().max()) <= 1e-5 * float(w.abs().max())
    path, note = native.op_paths(nat)["fc"]
    assert path == "int8" and "g x w on bf16 over the weight's values with its per-channel scale folded in" in note
    assert native.product_paths(nat)["fc"] == ("int8", "bf16", "int8")


def test_without_bf16_units_a_linear_layers_g_x_w_stays_in_fp32(monkeypatch):
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    torch.manual_seed(0)
    inputs = (torch.randn(16, 48),)
    sim, nat = _pair(Lin(), fracpass.Plan.static(8, 8, 8, rules=CHANNEL), inputs, EVERY_SIZE)
    folds = _counting(monkeypatch, native.int8_mm, "folded_input_grad")
    _run(nat, inputs)
    assert not folds
    path, note = native.op_paths(nat)["fc"]
    assert path == "int8" and "g x w in fp32" in note and "weight_scale='tensor'" in note
    assert native.product_paths(nat)["fc"] == ("int8", "fp32", "int8")
