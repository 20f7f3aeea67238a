"""One-call CPU forms of the quantizers' scalar arithmetic (quant_cpu.cpp's affine_params, track_range_).

fracpass.quant.affine_params and ActQuant._track run about ten tensor ops on one range each call; on a
float32 CPU range they take one kernel call instead. The results must be the torch ops' bit for bit
(zeros' signs included), on ordinary, zero, one-sided, tiny, huge and non-finite ranges, and the torch
ops must still run where the kernels do not apply (tracing, other dtypes, a momentum of 0.5 or more).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fracpass import kernels, quant


@pytest.fixture(autouse=True)
def need_kernels():
    if kernels.load() is None:
        pytest.skip("the fused CPU kernels are not built here")


def _bits(t):
    return t.detach().reshape(-1).view(torch.int32) if t.dtype == torch.float32 else t.detach().reshape(-1)


VALUES = [0.0, -0.0, 1.5, -2.25, 3e-39, -3e-39, 1e-30, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan"),
          123.456, -0.001]


@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1, 1)])
def test_affine_params_is_the_torch_ops_bit_for_bit(shape, monkeypatch):
    cases = 0
    for mn, mx, levels in itertools.product(VALUES, VALUES, [1.0, 3.0, 15.0, 255.0, 65535.0]):
        a, b = torch.tensor(mn).reshape(shape), torch.tensor(mx).reshape(shape)
        fast = quant.affine_params(a, b, levels)
        with monkeypatch.context() as m:
            m.setattr(quant, "_scalar_kernels", lambda *_: None)
            slow = quant.affine_params(a, b, levels)
        for f, s in zip(fast, slow):
            assert f.shape == s.shape and f.dtype == s.dtype and torch.equal(_bits(f), _bits(s)), (mn, mx, levels)
        cases += 1
    assert cases == len(VALUES) ** 2 * 5


def _spy_on(monkeypatch, name):
    """The calls quant makes to the kernels' ``name`` from now on (the kernels otherwise as they are)."""
    calls = []
    ext = kernels.load()

    class Spy:
        def __getattr__(self, attr):
            f = getattr(ext, attr)
            return f if attr != name else lambda *a: (calls.append(1), f(*a))[1]

    monkeypatch.setattr(quant.kernels, "load", lambda: Spy())
    return calls


def test_affine_params_takes_the_kernel_only_for_a_plain_float32_cpu_range(monkeypatch):
    calls = _spy_on(monkeypatch, "affine_params")
    one = torch.tensor(1.0)
    quant.affine_params(-one, one, 255.0)
    assert calls == [1]
    quant.affine_params(-one.double(), one.double(), 255.0)  # float64
    quant.affine_params(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]), 255.0)  # per channel
    quant.affine_params(-one, one, torch.tensor(255.0))  # a tensor of levels (gated rows)
    quant.affine_params(-one.requires_grad_(), one, 255.0)  # autograd
    assert calls == [1]


def _tracker(momentum=0.1):
    q = quant.ActQuant([8], momentum=momentum)
    return q.train()


def _state(q):
    return [q.running_min, q.running_max, q.range_ready, q.nonfinite_batches]


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.3])
def test_range_tracking_is_the_torch_ops_bit_for_bit(momentum, monkeypatch):
    """A sequence of batch ranges (the first non-finite, finite ones far apart, NaN and inf ones between):
    the running range, the ready flag and the count of skipped batches after each, and each buffer's
    version moved as the in-place ops move it."""
    g = torch.Generator().manual_seed(0)
    ranges = [(float("nan"), 1.0)] + [tuple(sorted((torch.randn(2, generator=g) * 10 ** k).tolist()))
                                      for k in range(-3, 4)] + [(-1.0, float("inf")), (-0.0, 0.0), (2.5, 7.75)]
    fast, slow = _tracker(momentum), _tracker(momentum)
    assert quant._lerp_is_fma()
    for mn, mx in ranges:
        a, b = torch.tensor(mn), torch.tensor(mx)
        before = [t._version for t in _state(fast)]
        fast._track(a, b)
        assert all(t._version > v for t, v in zip(_state(fast), before))
        with monkeypatch.context() as m:
            m.setattr(quant, "_scalar_kernels", lambda *_: None)
            slow._track(a, b)
        for f, s in zip(_state(fast), _state(slow)):
            assert f.dtype == s.dtype and torch.equal(_bits(f), _bits(s)), (mn, mx)
    assert int(fast.nonfinite_batches) == 2 and bool(fast.range_ready)


def test_a_momentum_of_a_half_or_more_keeps_the_torch_ops(monkeypatch):
    q = _tracker(momentum=0.5)
    calls = _spy_on(monkeypatch, "track_range_")
    q._track(torch.tensor(-1.0), torch.tensor(2.0))
    q._track(torch.tensor(-3.0), torch.tensor(4.0))
    assert calls == [] and float(q.running_min) == -2.0 and float(q.running_max) == 3.0
    q2 = _tracker(momentum=0.1)
    q2._track(torch.tensor(-1.0), torch.tensor(2.0))
    assert calls == [1]


def test_the_kernel_refuses_what_it_does_not_compute():
    ext = kernels.load()
    one = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="float32 CPU scalars"):
        ext.track_range_(one.double(), one, torch.tensor(True), torch.tensor(0), one, one, 0.1)
    with pytest.raises(RuntimeError, match="momentum under 0.5"):
        ext.track_range_(one.clone(), one.clone(), torch.tensor(True), torch.tensor(0), one, one, 0.5)
    with pytest.raises(RuntimeError, match="one float32 CPU range"):
        ext.affine_params(torch.ones(2), torch.ones(2), 255.0)


def test_tracing_keeps_the_torch_ops():
    """Under torch.jit.trace (ONNX export) the range arithmetic must stay visible as ops."""
    def f(mn, mx):
        return quant.affine_params(mn, mx, 255.0)[0]

    traced = torch.jit.trace(f, (torch.tensor(-1.0), torch.tensor(3.0)))
    assert any(n.kind() == "aten::div" for n in traced.graph.nodes())
    assert torch.equal(traced(torch.tensor(-2.0), torch.tensor(6.0)), f(torch.tensor(-2.0), torch.tensor(6.0)))
