"""fuse-native-bn (fracpass.passes.FuseNativeBNPass): a bf16 convolution with the BatchNorm it feeds, and
the residual add and ReLU after it, as one op (fracpass::bf16_conv_bn) that keeps less for backward.

Contract (with the fused op's BatchNorm on aten's kernels, ``NativeOptions(fast_bn=False)``; its own CPU
kernels are checked in tests/native/test_conv_bn.py): the fused model computes what the unfused native
model computes, bit for bit — outputs,
every gradient, BatchNorm's running statistics and batch count — in training and eval, NCHW and
channels_last, gated or not, at gradient bits that draw stochastic-rounding noise (the fused op
takes the unfused nodes' place in the backward order, so the noise is drawn in the same order). What
changes is what backward keeps: the convolution's bfloat16 product instead of BatchNorm's float32
input, and a one-byte mask instead of the ReLU's float32 output.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
import fracpass.state
from fracpass import native
from test_native import kernels  # noqa: F401 (fixture: csrc/native_*.cpp's kernels, then the torch ops)

# small convolutions on the bf16 path; the fused op's BatchNorm on aten's kernels, bit for bit the unfused
# ops (what these tests check): its own kernels (NativeOptions.fast_bn) are checked in tests/native/test_conv_bn.py
# channels_last=False: each test's layout as given (test_layout.py checks the default conversion)
OPTS = fracpass.NativeOptions(min_conv_macs=0, fast_bn=False, channels_last=False)


@pytest.fixture(autouse=True)
def bf16_every_size(monkeypatch):
    if native.bf16_support() is not None:
        pytest.skip("this CPU has no bfloat16 dot-product instructions: convolutions run simulated")


class Block(nn.Module):
    """conv -> bn -> relu -> conv -> bn (+ shortcut, optionally through a 1x1 conv computed after the
    main branch) -> relu, then a linear head."""

    def __init__(self, cin=4, cout=None, downsample=True, bn=nn.BatchNorm2d, relu=nn.ReLU):
        super().__init__()
        cout = cout or (6 if downsample else cin)  # an identity shortcut keeps the channels
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), bn(cout), relu()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(cout, cout, 3, padding=1, bias=True), bn(cout), relu()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), bn(cout)) if downsample else None
        self.head = nn.Linear(cout, 3)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (self.down(x) if self.down is not None else x)
        return self.head(self.relu2(out).mean((2, 3)))


def _unfused_native(model, plan, inputs, monkeypatch, opts=OPTS, **options):
    return fracpass.transform(model, plan, example_inputs=inputs, execution="native",
                              native=opts.replace(fuse_bn=False), **options)


def _pair(model, plan, inputs, monkeypatch, opts=OPTS, **options):
    fused = fracpass.transform(model, plan, example_inputs=inputs, execution="native", native=opts, **options)
    plain = _unfused_native(model, plan, inputs, monkeypatch, opts, **options)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _step(qmodel, x, seed=5):
    """Output, input gradient, parameter gradients of one training step's loss (noise fixed by seed)."""
    qmodel.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = qmodel(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in qmodel.parameters()]


def _assert_identical(fused, plain, x, steps=2):
    for i in range(steps):
        got, want = _step(fused, x, seed=i), _step(plain, x, seed=i)
        for k, (g, w) in enumerate(zip(got, want)):
            assert (g is None) == (w is None) and (g is None or torch.equal(g, w)), f"step {i}: tensor {k} differs"
        state, ref = fused.state_dict(), plain.state_dict()
        assert state.keys() == ref.keys()
        assert all(torch.equal(state[k], ref[k]) for k in state), "BatchNorm statistics differ"


@pytest.mark.parametrize("numel", [3 * 5 * 4 * 6, 3 * 5 * 3 * 3])  # whole bytes of mask bits, and a partial last one
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_relu_mask_and_its_gradient_are_torchs_relu_and_threshold_backward(layout, numel, kernels):
    x = torch.randn(3, 5, 4, 6) if numel == 360 else torch.randn(3, 5, 3, 3)
    x.view(-1)[:6] = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-45])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out, ref = x.clone(), torch.relu(x)
    dead = native.conv_bn._relu_mask_(out)
    assert out.stride() == x.stride()
    assert torch.equal(out.nan_to_num(), ref.nan_to_num()) and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.signbit(), ref.signbit())  # -0.0 stays -0.0, as in clamp_min
    # the kernels keep one bit per element, the torch ops a bool per element
    assert (dead.dtype, dead.numel()) == ((torch.uint8, -(-x.numel() // 8)) if kernels == "fused" else
                                          (torch.bool, x.numel()))
    grad = torch.randn(x.shape).as_strided(x.shape, x.stride())
    grad[1, 2, 2, 1] = float("nan")
    got, want = native.conv_bn._relu_grad(grad, dead, x.stride()), torch.ops.aten.threshold_backward(grad, ref, 0)
    assert got.stride() == want.stride()
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
    # a gradient in another layout than out's: threshold_backward's result and layout
    other = grad.contiguous() if layout == "channels_last" else grad.contiguous(memory_format=torch.channels_last)
    got, want = native.conv_bn._relu_grad(other, dead, x.stride()), torch.ops.aten.threshold_backward(other, ref, 0)
    assert got.stride() == want.stride() and torch.equal(got.nan_to_num(), want.nan_to_num())


def _fused_nodes(qmodel):
    return [n for n in qmodel.graph.nodes if n.target in (native.calls.bf16_conv1d_bn, native.calls.bf16_conv2d_bn,
                                                           native.calls.bf16_conv3d_bn)]


@pytest.mark.parametrize("gbits", [8, 32])
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("downsample", [False, True])
def test_fused_block_equals_the_unfused_one_bit_for_bit(downsample, layout, gbits, kernels, monkeypatch):
    torch.manual_seed(0)
    model, x = Block(downsample=downsample), torch.randn(4, 4, 8, 8)
    if layout == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    fused, plain = _pair(model, fracpass.Plan.static(8, 8, gbits), (x,), monkeypatch)
    nodes = _fused_nodes(fused)
    # conv1+bn1+relu1 and conv2+bn2+add+relu2 (the downsample conv, computed after conv2, keeps the add
    # out of conv2's op: conv2+bn2 then; the 1x1 conv fuses with its BatchNorm)
    assert len(nodes) == (3 if downsample else 2)
    assert [n.args[13] is not None for n in nodes if n.name == "conv2"] == [not downsample]
    assert not any(n.op == "call_module" and isinstance(fused.get_submodule(n.target), (nn.BatchNorm2d, nn.ReLU))
                   for n in fused.graph.nodes) or downsample
    _assert_identical(fused, plain, x)
    fused.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))


def test_pass_contract_names_paths_and_stats(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = fracpass.models.resnet20()
    fused, plain = _pair(model, fracpass.Plan.static(8, 8, 8), (x,), monkeypatch)
    fused.graph.lint()
    assert native.op_paths(fused) == native.op_paths(plain)  # same op names, same paths and reasons
    assert native.product_paths(fused) == native.product_paths(plain)
    assert fracpass.summary(fused).splitlines()[1:] == fracpass.summary(plain).splitlines()[1:]
    stats = fracpass.state.model_state(fused).stats[True]["fuse-native-bn"]
    # 19 3x3 + 2 downsample convs fused; each block's second convolution reads its first's output alone
    assert stats == {"fused": len(_fused_nodes(fused)), "handover": 18, "sole_reader": 9} and stats["fused"] == 21
    # running the pass again changes nothing
    before = fused.code
    assert fracpass.passes.FuseNativeBNPass()(fused).stats == {"fused": 0, "handover": 0, "sole_reader": 0} and fused.code == before


def test_whole_resnet_trains_identically_fused_and_unfused(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model = fracpass.models.resnet20().to(memory_format=torch.channels_last)
    plan = fracpass.Plan.progressive(fw=(4, 8), bw=(6, 8))
    fused, plain = _pair(model, plan, (x,), monkeypatch)
    _assert_identical(fused, plain, x)
    fracpass.set_stage(fused, 1), fracpass.set_stage(plain, 1)
    _assert_identical(fused, plain, x, steps=1)


def test_gated_resnet_fuses_its_convolutions_and_stays_identical(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32) * torch.linspace(-2, 2, 8).view(8, 1, 1, 1)
    fused, plain = _pair(fracpass.models.resnet20(), fracpass.Plan.fractrain("cifar"), (x,), monkeypatch)
    assert _fused_nodes(fused) and any(n.args[10] is not None for n in _fused_nodes(fused))  # gated ones too
    # a gated block's merge add (where a=0 skips the block) keeps its node
    assert all(n.args[13] is None for n in _fused_nodes(fused) if n.args[10] is not None)
    _assert_identical(fused, plain, x)


def test_bits_that_leave_the_convolution_simulated_run_the_unfused_ops(monkeypatch):
    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 4, 8, 8)
    fused, plain = _pair(model, fracpass.Plan.static(12, 12, 8), (x,), monkeypatch)
    assert _fused_nodes(fused) and native.op_paths(fused)["conv1"][0] == "simulated"
    _assert_identical(fused, plain, x)
    default = OPTS.replace(min_conv_macs=100e6)  # the default: these convolutions are too small
    fused, plain = _pair(model, fracpass.Plan.static(8, 8, 8), (x,), monkeypatch, default)
    _assert_identical(fused, plain, x)
    assert "a small convolution" in native.op_paths(fused)["conv1"][1]


class FrozenStatsBN(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward: the fused op runs it unfused."""

    def forward(self, x):
        return super().forward(x) * 1.0


@pytest.mark.parametrize("bn", [
    lambda c: nn.BatchNorm2d(c, momentum=None),  # cumulative average: 1 / num_batches_tracked
    lambda c: nn.BatchNorm2d(c, affine=False),
    lambda c: nn.BatchNorm2d(c, track_running_stats=False),
    FrozenStatsBN,
], ids=["momentum None", "affine False", "no running stats", "subclass with its own forward"])
def test_batchnorm_variants_stay_identical(bn, monkeypatch):
    torch.manual_seed(0)
    model, x = Block(downsample=False, bn=bn), torch.randn(4, 4, 8, 8)
    fused, plain = _pair(model, fracpass.Plan.static(8, 8, 8), (x,), monkeypatch,
                         leaf_modules=[FrozenStatsBN])  # a call_module, as torch's own BatchNorm
    assert len(_fused_nodes(fused)) == 2
    _assert_identical(fused, plain, x, steps=3)
    fused.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))


def test_one_value_per_channel_in_training_raises_as_batchnorm_does(monkeypatch):
    """nn.BatchNorm refuses to train on one value per channel (F.batch_norm's check); the fused op
    raised nothing and left NaN running variances (aten divides by n - 1 = 0)."""
    torch.manual_seed(0)
    model = Block(downsample=False)
    fused = fracpass.transform(model, fracpass.Plan.static(8, 8, 8), example_inputs=(torch.randn(2, 4, 8, 8),),
                               execution="native", native=OPTS)
    assert _fused_nodes(fused)
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError) as plain:
        model(x)
    with pytest.raises(ValueError) as got:
        fused(x)
    assert str(got.value) == str(plain.value)
    fused.eval()
    assert torch.isfinite(fused(x)).all() and all(torch.isfinite(t).all() for t in fused.state_dict().values())


def test_unfusable_chains_keep_their_nodes(monkeypatch):
    class Shapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c3, self.b3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            a = self.b1(self.c1(x))
            b = a + a.mean()                       # bn1's output has two users: bn1 fused, no add or ReLU
            c = F.leaky_relu(self.b2(self.c2(b)))  # not a ReLU: conv2 + bn2 only
            d = self.b3(self.c3(c)) + c            # an add without a ReLU after it: conv3 + bn3 only
            return d

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    fused, plain = _pair(Shapes(), fracpass.Plan.static(8, 8, 8), (x,), monkeypatch)
    nodes = {n.name: n for n in _fused_nodes(fused)}
    assert set(nodes) == {"c1", "c2", "c3"} and all(n.args[12] is None and n.args[13] is None for n in nodes.values())
    assert [n.target for n in fused.graph.nodes if n.op == "call_function" and "leaky" in str(n.target)]
    _assert_identical(fused, plain, x)


def test_saved_for_backward_are_bf16_products_and_masks(kernels, monkeypatch):
    torch.manual_seed(0)
    model, x = Block(downsample=False, cin=6, cout=6), torch.randn(4, 6, 8, 8)
    fused, plain = _pair(model, fracpass.Plan.static(8, 8, 8), (x,), monkeypatch)

    def saved(qmodel):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            qmodel(x.clone().requires_grad_()).sum().backward()
        return sorted((str(t.dtype), t.numel()) for t in kept if t.numel() in (x.numel(), x.numel() // 8))

    n = x.numel()
    # the input codes as bytes from the kernels (codes_to_u8), bfloat16 from the torch ops
    codes = ("torch.uint8", n) if kernels == "fused" else ("torch.bfloat16", n)
    # unfused: per conv its input's codes, BatchNorm's float32 input, the ReLU's float32 output
    assert saved(plain) == sorted([codes] * 2 + [("torch.float32", n)] * 4)
    # fused: per conv its input's codes, its bfloat16 product, the ReLU's mask: 8 elements a byte from
    # the kernels, a bool each from the torch ops
    mask = ("torch.uint8", n // 8) if kernels == "fused" else ("torch.bool", n)
    assert saved(fused) == sorted([codes] * 2 + [("torch.bfloat16", n)] * 2 + [mask] * 2)


def test_copy_pickle_and_onnx_export_as_for_the_simulated_model(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 4, 8, 8)
    plan = fracpass.Plan.static(8, 8, 8)
    fused = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=OPTS)
    sim = fracpass.transform(model, plan, example_inputs=(x,))
    sim.load_state_dict(fused.state_dict())
    for q in (fused, sim):
        _step(q, x)  # a training batch: ranges for export
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert torch.equal(_step(clone, x, seed=3)[0], _step(copy.deepcopy(fused), x, seed=3)[0])
    pytest.importorskip("onnx")
    fused.load_state_dict(sim.state_dict())  # BatchNorm's statistics saw the bf16 products: the simulation's
    sim.eval(), fused.eval()
    a = fracpass.export_onnx(sim, tmp_path / "sim.onnx", (x,))
    b = fracpass.export_onnx(fused, tmp_path / "nat.onnx", (x,))
    assert a.SerializeToString() == b.SerializeToString()


def test_int8_convolutions_opted_in_are_not_fused(monkeypatch):
    torch.manual_seed(0)
    model, x = Block(downsample=False), torch.randn(4, 4, 8, 8)
    plan = fracpass.Plan.static(8, 8, 8)
    fused, plain = _pair(model, plan, (x,), monkeypatch, OPTS.replace(kinds=native.KINDS))
    assert not _fused_nodes(fused)
    assert [n.name for n in fused.graph.nodes if n.target is native.calls.native_conv2d] == ["conv1", "conv2"]
    _assert_identical(fused, plain, x)
