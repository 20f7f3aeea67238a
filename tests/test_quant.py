"""Numerics of the quantizer ops and modules."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fracpass.quant import ActQuant, GradQuant, WeightQuant, fake_quantize, quantize_grad_stochastic


def scale_of(x, bits, dims=None):
    mn = x.amin(dims, keepdim=True) if dims else x.min()
    mx = x.amax(dims, keepdim=True) if dims else x.max()
    mn, mx = mn.clamp(max=0), mx.clamp(min=0)
    return (mx - mn) / (2**bits - 1)


def reference_fake_quant(x, mn, mx, bits):
    """ONNX QuantizeLinear -> DequantizeLinear, written out in float64."""
    x, mn, mx = x.double(), mn.double().clamp(max=0), mx.double().clamp(min=0)
    levels = 2**bits - 1
    s = (mx - mn) / levels
    zp = torch.round(-mn / s)
    return ((torch.round(x / s) + zp).clamp(0, levels) - zp) * s


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12])
def test_fake_quantize_matches_reference(bits):
    x = torch.randn(4096) * 3 + 0.5
    out = fake_quantize(x, x.min(), x.max(), bits)
    ref = reference_fake_quant(x, x.min(), x.max(), bits).float()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * float(x.abs().max()))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    bits=st.integers(2, 16),
    magnitude=st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30, 3e37]),
    offset=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_act_quant_levels_and_error_bound(shape, bits, magnitude, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g) + offset) * magnitude
    q = ActQuant([bits]).train()
    out = q(x)
    assert torch.isfinite(out).all()
    assert out.unique().numel() <= 2**bits
    s = scale_of(x, bits)
    # error at most s/2, plus float rounding of the dequantized value
    assert (out - x).abs().max() <= s / 2 * (1 + 1e-5) + 1e-6 * x.abs().max()


@settings(max_examples=30, deadline=None)
@given(value=st.sampled_from([0.0, 1.0, -2.5, 1e-38, 1e30, -3e38]), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       bits=st.integers(2, 16))
def test_constant_tensors_stay_finite_and_exact(value, shape, bits):
    x = torch.full(shape, value)
    out = ActQuant([bits]).train()(x)
    assert torch.isfinite(out).all()
    # exact, except below the smallest normal float, where the scale floors at finfo.tiny
    torch.testing.assert_close(out, x, rtol=1e-6, atol=torch.finfo(torch.float32).tiny / 2)
    w = WeightQuant([bits])(torch.full(shape, value))
    assert torch.isfinite(w).all()


def test_nan_or_inf_input_makes_the_whole_output_nan():
    for bad in (float("nan"), float("inf")):
        x = torch.randn(10)
        x[3] = bad
        assert torch.isnan(ActQuant([4]).train()(x)).all()
        assert torch.isnan(quantize_grad_stochastic(x, 8)).all()


@settings(max_examples=40, deadline=None)
@given(out_ch=st.integers(1, 6), rest=st.lists(st.integers(1, 5), min_size=1, max_size=3), bits=st.integers(2, 16),
       axis_last=st.booleans(), seed=st.integers(0, 2**16))
def test_weight_quant_per_channel(out_ch, rest, bits, axis_last, seed):
    g = torch.Generator().manual_seed(seed)
    shape = [out_ch] + rest
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 3, out_ch).view([-1] + [1] * len(rest))
    axis = 0
    if axis_last:
        w, axis = w.movedim(0, -1).contiguous(), -1
    out = WeightQuant([bits], axis=axis)(w)
    per_channel = out.movedim(axis, 0).reshape(out_ch, -1)
    ref = w.movedim(axis, 0).reshape(out_ch, -1)
    for c in range(out_ch):
        assert per_channel[c].unique().numel() <= 2**bits
        s = scale_of(ref[c], bits)
        assert (per_channel[c] - ref[c]).abs().max() <= s / 2 * (1 + 1e-5) + 1e-6 * ref[c].abs().max()


def test_straight_through_gradient():
    x = torch.randn(100, requires_grad=True)
    ActQuant([3]).train()(x).mul(torch.arange(100.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(100.0))
    w = torch.randn(4, 5, requires_grad=True)
    WeightQuant([2])(w).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(4, 5))


def test_32_bits_is_identity_and_no_copy():
    x = torch.randn(3, 4, requires_grad=True)
    for q in (ActQuant([32]), WeightQuant([32]), GradQuant([32])):
        assert q(x) is x


def test_ema_range_used_in_eval():
    q = ActQuant([8], momentum=0.5).train()
    q(torch.tensor([-1.0, 1.0]))
    q(torch.tensor([-3.0, 3.0]))
    assert float(q.running_min) == pytest.approx(-2.0) and float(q.running_max) == pytest.approx(2.0)
    q.eval()
    out = q(torch.tensor([-10.0, 0.0, 10.0]))  # clamped to the EMA range
    half_step = 4.0 / 255 / 2  # the integer zero point puts the grid within half a step of the range
    assert -2.0 - half_step <= out.min() <= -2.0 + half_step and 2.0 - half_step <= out.max() <= 2.0 + half_step
    assert out[1] == 0.0
    fresh = ActQuant([8]).eval()  # no range yet: falls back to the batch range
    x = torch.tensor([-4.0, 4.0])
    assert (fresh(x) - x).abs().max() <= 8.0 / 255 / 2 + 1e-6
    assert not fresh._range_ready  # eval mode never records a range


def test_grad_quant_identity_forward_quantized_backward():
    x = torch.randn(64, 32, requires_grad=True)
    y = GradQuant([4])(x)
    assert torch.equal(y, x)
    upstream = torch.randn(64, 32)
    y.backward(upstream)
    assert x.grad.unique().numel() <= 16
    s = (upstream.max() - upstream.min()) / 15
    assert (x.grad - upstream).abs().max() <= s * (1 + 1e-5)  # stochastic rounding: within one step


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_is_unbiased(bits):
    torch.manual_seed(1234)
    g = torch.linspace(-1.0, 1.0, 257)
    draws = torch.stack([quantize_grad_stochastic(g, bits) for _ in range(2000)])
    s = 2.0 / (2**bits - 1)
    # each element's mean over 2000 draws: std at most s / (2 sqrt(2000)); the discrete dither adds <= s/512
    err = (draws.mean(0) - g).abs()
    assert err.max() <= 5 * s / (2 * math.sqrt(2000)) + s / 512
    # and it really is random: values between grid points take both neighbours
    assert draws[:, 1].unique().numel() == 2


def test_stochastic_rounding_is_reproducible_under_manual_seed():
    g = torch.randn(1000)
    torch.manual_seed(7)
    a = quantize_grad_stochastic(g, 4)
    torch.manual_seed(7)
    b = quantize_grad_stochastic(g, 4)
    assert torch.equal(a, b)
    assert not torch.equal(a, quantize_grad_stochastic(g, 4))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), bits=st.integers(2, 16),
       magnitude=st.sampled_from([1e-20, 1e-3, 1.0, 1e4, 1e30]), seed=st.integers(0, 2**16))
def test_grad_quant_levels_and_finite(shape, bits, magnitude, seed):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * magnitude
    out = quantize_grad_stochastic(g, bits)
    assert torch.isfinite(out).all()
    assert out.unique().numel() <= 2**bits
    s = (g.max() - g.min()) / (2**bits - 1)
    assert (out - g).abs().max() <= s * (1 + 1e-4) + 1e-6 * g.abs().max()
    assert out.min() >= g.min() - 1e-6 * g.abs().max() and out.max() <= g.max() + s * 1e-4 + 1e-6 * g.abs().max()


def test_grad_quant_constant_and_zero_gradients():
    for value in (0.0, 2.0, -1e30):
        g = torch.full((5, 5), value)
        torch.testing.assert_close(quantize_grad_stochastic(g, 4), g)


def test_bits_are_state_and_survive_state_dict():
    q = ActQuant([3, 4, 6, 8])
    q.set_stage(2)
    assert q.bits == 6
    fresh = ActQuant([3, 4, 6, 8])
    fresh.load_state_dict(q.state_dict())
    assert fresh.bits == 6 and int(fresh.stage) == 2
    q.train()(torch.randn(10))
    fresh.load_state_dict(q.state_dict())
    assert fresh._range_ready


def test_no_host_sync_in_hot_path(monkeypatch):
    """Forward and backward never call .item() / .tolist() / .cpu() on a tensor."""
    calls = []
    for name in ("item", "tolist", "cpu"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(self, *a, **k))
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    aq, wq, gq = ActQuant([4]).train(), WeightQuant([4]), GradQuant([6])
    gq(torch.nn.functional.linear(aq(x), wq(w))).sum().backward()
    aq.eval()(x)
    assert calls == []


# -- the fused CPU kernels against the torch-op path --------------------------------------------
from fracpass import kernels  # noqa: E402


@pytest.fixture
def torch_ops(monkeypatch):
    """Run the quantizers on the torch-op path."""
    monkeypatch.setenv("FRACPASS_KERNELS", "0")


def test_kernels_build():
    assert kernels.load() is not None, "the fused kernels should build on this machine (C++ compiler + ninja)"


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), bits=st.integers(2, 16),
       magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e5, 3e37]), offset=st.floats(-1, 1),
       per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_fake_quant_is_bit_identical_to_torch_ops(shape, bits, magnitude, offset, per_channel, seed):
    import os

    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + offset) * magnitude
    if per_channel:
        mn, mx = torch.aminmax(x.reshape(shape[0], -1), dim=1)
        mn, mx = mn.view([-1] + [1] * (len(shape) - 1)), mx.view([-1] + [1] * (len(shape) - 1))
    else:
        mn, mx = torch.aminmax(x)
    fused = fake_quantize(x, mn, mx, bits)
    os.environ["FRACPASS_KERNELS"] = "0"
    try:
        reference = fake_quantize(x, mn, mx, bits)
    finally:
        del os.environ["FRACPASS_KERNELS"]
    assert torch.equal(fused, reference)


def test_fused_fake_quant_nan_and_ties():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.0])  # ties round half to even, as ONNX
    out = fake_quantize(x, torch.tensor(-3.0), torch.tensor(3.0), 3)
    reference = reference_fake_quant(x, torch.tensor(-3.0), torch.tensor(3.0), 3).float()
    assert torch.equal(out, reference)
    x[2] = float("nan")
    assert torch.isnan(fake_quantize(x, *torch.aminmax(x), 4)).all()


@pytest.mark.parametrize("bits", [2, 8])
def test_stochastic_rounding_unbiased_on_torch_op_path(torch_ops, bits):
    test_stochastic_rounding_is_unbiased(bits)


def test_stochastic_rounding_independent_of_thread_count():
    g = torch.randn(3 * 2**20 + 17)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(3)
        one = quantize_grad_stochastic(g, 6)
        torch.set_num_threads(2)
        torch.manual_seed(3)
        two = quantize_grad_stochastic(g, 6)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_grad_quant_non_contiguous_and_half_precision():
    g = torch.randn(64, 32).t()  # strided: copied to contiguous for the kernel
    out = quantize_grad_stochastic(g, 4)
    assert out.shape == g.shape and out.unique().numel() <= 16
    h = torch.randn(100, dtype=torch.bfloat16)  # not float32: torch-op path
    assert quantize_grad_stochastic(h, 4).dtype == torch.bfloat16


def test_channels_last_tensors_stay_channels_last_through_the_quantizers():
    """A channels_last model keeps its layout: the fused kernels run over memory order and write with
    the input's strides (a copy to contiguous and back cost ~1 ms per 4 MB tensor per quantizer)."""
    from fracpass import quant

    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    cl = lambda t: t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    # fake quantization is elementwise: the same values whatever the layout
    mn, mx = x.min(), x.max()
    out = fake_quantize(x, mn, mx, 4)
    assert cl(out) and torch.equal(out, fake_quantize(x.contiguous(), mn, mx, 4))
    aq = ActQuant([4]).train()
    assert cl(aq(x)) and torch.equal(aq(x), fake_quantize(x.contiguous(), mn, mx, 4))
    # the min and max are read in memory order, without a copy, and equal aten's
    assert all(torch.equal(a, b) for a, b in zip(quant.value_range(x), torch.aminmax(x.contiguous())))
    # stochastic rounding: the dither is keyed by memory index, so a channels_last gradient is rounded
    # exactly as its memory read flat would be, and stays channels_last
    torch.manual_seed(3)
    g = quantize_grad_stochastic(x, 6)
    torch.manual_seed(3)
    flat = quantize_grad_stochastic(x.permute(0, 2, 3, 1).reshape(-1), 6)  # the same memory, contiguous
    assert cl(g) and torch.equal(g.permute(0, 2, 3, 1).reshape(-1), flat)
    x5 = torch.randn(2, 3, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    assert quant.rows_outer_dense(x5) and not quant.rows_outer_dense(torch.randn(3, 4).t())


def test_attention_head_views_are_quantized_as_they_lie_in_memory(monkeypatch):
    """An attention layer's q, k and v reach their quantizers as (b, h, t, d) views of (b, t, h, d) linear
    outputs: dense with dim 0 outermost, neither contiguous nor channels_last. Fake quantization is
    elementwise and the range order-free, so the kernels read such a view in memory order and write with
    its strides (on the d512 transformer each was copied to contiguous, then quantized by five torch ops:
    ~20 ms a step)."""
    from fracpass import quant

    if kernels.load() is None:
        pytest.skip("the fused CPU kernels are not built here")
    x = torch.randn(4, 16, 2, 8).transpose(1, 2)
    ext, calls, read = kernels.load(), [], []

    class Spy:
        def __getattr__(self, name):
            f = getattr(ext, name)
            return f if name != "fake_quant" else lambda *a: (calls.append(a[0]), f(*a))[1]

    monkeypatch.setattr(quant.kernels, "load", lambda: Spy())
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t, *a, **k: (read.append(t), aminmax(t, *a, **k))[1])
    mn, mx = quant.value_range(x)
    assert read[-1].dim() == 1 and read[-1].data_ptr() == x.data_ptr()  # no copy
    assert torch.equal(mn, x.min()) and torch.equal(mx, x.max())
    out = fake_quantize(x, mn, mx, 4)
    assert len(calls) == 1 and calls[0] is x and out.stride() == x.stride()
    assert torch.equal(out, fake_quantize(x.contiguous(), mn, mx, 4))
    rows = torch.aminmax(x.reshape(4, -1), dim=1)  # one range per sample (gated rows)
    mn_r, mx_r = (r.view(4, 1, 1, 1) for r in rows)
    assert torch.equal(fake_quantize(x, mn_r, mx_r, 3), fake_quantize(x.contiguous(), mn_r, mx_r, 3))
    assert len(calls) == 4 and calls[2] is x
    # not rows in memory: dim 0 inside another dim, gaps, overlaps (the torch ops, same values)
    overlapping = torch.randn(4, 6).as_strided((4, 3, 2), (6, 1, 1))  # dim 0's stride right, windows inside
    for t in (torch.randn(3, 4, 5).transpose(0, 1), torch.randn(4, 10)[:, ::2], torch.randn(1, 5).expand(3, 5),
              overlapping):
        assert not quant._outer_dense(t)
        mn, mx = torch.aminmax(t)
        assert torch.equal(fake_quantize(t, mn, mx, 4), fake_quantize(t.contiguous(), mn, mx, 4))
    assert len(calls) == 8  # the contiguous copies' only
    assert quant._outer_dense(x) and not quant.rows_outer_dense(x)
