"""The quantizer kernels as torch ops (fracpass.kernel_ops): torch.library.opcheck per op (schema and its
mutation annotations, fake implementation, autograd registration, AOT dispatch), the same values as the
pybind functions fracpass.quant calls (bit for bit), and a graph that torch.compile traces through them
without a break. (The native kernels' ops: tests/native/test_kernel_ops.py.)"""
from __future__ import annotations

import pytest
import torch

from fracpass import kernel_ops, kernels, quant


@pytest.fixture(scope="module")
def ops():
    ops = kernel_ops.load()
    if ops is None:
        pytest.skip("the fused quantizer kernels could not be built here")
    return ops


def _args(name):
    torch.manual_seed(0)
    x, g = torch.randn(6, 40), torch.randn(6, 40)
    mn, mx = x.min(), x.max()
    rmn, rmx, rlv = x.amin(1), x.amax(1), torch.tensor([0.0, 3.0, 15.0, 255.0, 7.0, 1.0])
    return {
        "fake_quant": (x, mn, mx, 15.0),
        "grad_sr": (g, g.min(), g.max(), 15.0, torch.tensor(1234)),
        "fake_quant_rows": (x, rmn, rmx, rlv),
        "grad_sr_rows": (g, g.amin(1), g.amax(1), rlv, torch.tensor(1234)),
        "option_scores": (x, g, rmn, rmx, torch.tensor([3.0, 15.0, 15.0])),
        "affine_params": (mn.reshape(()), mx.reshape(()), 255.0),
        "track_range_": (torch.tensor(0.5), torch.tensor(1.5), torch.tensor(True), torch.tensor(0), mn.reshape(()),
                         mx.reshape(()), 0.1),
    }[name]


@pytest.mark.parametrize("name", sorted(kernel_ops.FAKES))
def test_opcheck(name, ops):
    torch.library.opcheck(getattr(ops, name).default, _args(name))


def test_every_op_has_a_fake_and_only_track_range_mutates(ops):
    assert sorted(kernel_ops.FAKES) == ["affine_params", "fake_quant", "fake_quant_rows", "grad_sr", "grad_sr_rows",
                                        "option_scores", "track_range_"]
    mutated = {name: [a.name for a in getattr(ops, name).default._schema.arguments if a.is_write]
               for name in kernel_ops.FAKES}
    assert mutated == {name: (["rmin", "rmax", "ready", "nonfinite"] if name == "track_range_" else [])
                       for name in kernel_ops.FAKES}


@pytest.mark.parametrize("name", sorted(kernel_ops.FAKES))
def test_ops_compute_what_the_pybind_functions_do(name, ops):
    ext = kernels.load()
    if name == "track_range_":  # in place: the same buffers after one update from each
        a, b = _args(name), _args(name)
        getattr(ops, name)(*a)
        getattr(ext, name)(*b)
        for x, y in zip(a[:4], b[:4]):
            assert torch.equal(x, y)
        assert a[3].item() == 0 and a[0].item() != 0.5  # a finite batch moved the range
        return
    as_ints = [int(a) if isinstance(a, torch.Tensor) and a.dtype == torch.int64 else a for a in _args(name)]  # the pybind seed is an int
    got, want = getattr(ops, name)(*_args(name)), getattr(ext, name)(*as_ints)
    got, want = (list(got), list(want)) if name == "affine_params" else ([got], [want])
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and x.stride() == y.stride()
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))  # bit for bit


def test_a_quantizer_step_compiles_without_graph_breaks(ops):
    def step(x, g):
        s, lo, hi = ops.affine_params(x.min().reshape(()), x.max().reshape(()), 15.0)
        y = ops.fake_quant(x, x.min(), x.max(), 15.0)
        return y * s, ops.grad_sr(g, g.min(), g.max(), 7.0, quant.draw_seed())

    x, g = torch.randn(8, 32), torch.randn(8, 32)
    explained = torch._dynamo.explain(step)(x, g)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    got = compiled(x, g)
    torch.manual_seed(3)
    for a, b in zip(got, step(x, g)):  # the seed drawn in the graph is eager's
        assert torch.equal(a, b)


def test_a_seed_that_is_not_one_int64_is_refused(ops):
    g = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"grad_sr: seed must be one int64 value on the CPU, got Float of 1"):
        ops.grad_sr(g, g.min(), g.max(), 7.0, torch.tensor(1.0))
