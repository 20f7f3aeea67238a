"""The fused conv-BN(-add)(-ReLU) op's BatchNorm on its own CPU kernels (fracpass.NativeOptions.fast_bn).

The op's BatchNorm runs straight from the convolution's bfloat16 product v (y = s v + bias): statistics
from per-channel sums in float64, the output as one affine map per channel, the backward from two
per-channel sums of the masked gradient. It is not aten's arithmetic, so it is checked against a float64
reference of the same BatchNorm (forward, running statistics, every gradient) to float32 rounding, on
channel counts that do and do not fill the kernels' 16-lane vectors, odd pixel counts (vector tails),
a mean far from zero beside a small spread, training and eval.
The whole fused model is then compared with the aten route (tests/native/test_fuse_native_bn.py checks that
route against the unfused ops bit for bit).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native

# channels_last=False: each test's layout as given (test_layout.py checks the default conversion)
OPTS = fracpass.NativeOptions(min_conv_macs=0, channels_last=False)  # small convolutions on the bf16 path; fast_bn (the default) on

TOL = 2e-5  # of each tensor's largest magnitude: float32 rounding of sums over a few thousand terms


@pytest.fixture(autouse=True)
def fast_bn(monkeypatch):
    if native.bf16_support() is not None or native.units.ext() is None:
        pytest.skip("no bf16 convolutions or no CPU kernels here: the fused op does not run")


def _product(shape, offset, generator, spread=20.0):
    """A channels-last bf16 'convolution product': values around ``offset`` with a spread of ``spread``."""
    v = (torch.randn(shape, generator=generator) * spread + offset).round()
    return v.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def _reference(v, scale, bias, w, b, rm, rv, training, momentum, eps, residual, relu, grad):
    """float64 BatchNorm of y = s v + bias (+ residual) (ReLU): out, running stats, dy, dw, db, d residual."""
    c = v.shape[1]
    view = lambda t: t.double().view(1, c, 1, 1)
    y = (v.double() * view(scale) + view(bias)).requires_grad_()
    w64 = w.double().requires_grad_()
    b64 = b.double().requires_grad_()
    res = residual.double().requires_grad_() if residual is not None else None
    if training:
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
        n = v.numel() // c
        rm = (1 - momentum) * rm.double() + momentum * mean.detach()
        rv = (1 - momentum) * rv.double() + momentum * var.detach() * n / (n - 1)
    else:
        mean, var = rm.double(), rv.double()
    out = (y - mean.view(1, c, 1, 1)) / (var.view(1, c, 1, 1) + eps).sqrt() * w64.view(1, c, 1, 1) + b64.view(1, c, 1, 1)
    if res is not None:
        out = out + res
    if relu:
        out = out.relu()
    out.backward(grad.double())
    return out.detach(), rm, rv, y.grad, w64.grad, b64.grad, None if res is None else res.grad


def _close(got, want, what):
    err = float((got.double() - want).abs().max())
    scale = float(want.abs().max()) or 1.0
    assert err <= TOL * scale, f"{what}: differs by {err:.3g} ({err / scale:.2g} of its largest magnitude {scale:.3g})"


@pytest.mark.parametrize("channels", [16, 6, 40])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("offset, spread", [(300.0, 20.0), (3e4, 300.0)])
def test_fast_batchnorm_matches_a_float64_reference(channels, residual, relu, training, offset, spread):
    """(3e4, 300): a mean 100x the spread, on bfloat16's coarse grid there (steps of 128)."""
    g = torch.Generator().manual_seed(channels)
    shape = (3, channels, 5, 7)  # 105 pixels: no multiple of 16
    v = _product(shape, offset, g, spread)
    scale, bias = torch.rand(channels, generator=g) * 1e-3 + 1e-4, torch.randn(channels, generator=g)
    w, b = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    rm, rv = torch.randn(channels, generator=g) * 0.1 + 0.3, torch.rand(channels, generator=g) + 0.5
    if not training:  # eval normalizes with the running statistics: make them the batch's, roughly
        y = v.double() * scale.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
        rm, rv = y.mean((0, 2, 3)).float(), y.var((0, 2, 3)).float()
    res = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last) if residual else None
    grad = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    want = _reference(v, scale, bias, w, b, rm, rv, training, 0.1, 1e-5, res, relu, grad)
    rm_got, rv_got = rm.clone(), rv.clone()
    ext = native.units.ext(v)
    post = (rm_got, rv_got, training, 0.1, 1e-5, relu)
    out, bits, ref, mean, invstd, (lo, hi) = native.conv_bn._fast_bn_forward(ext, v, scale, bias, w, b, res, post)
    assert out.stride() == v.stride() and out.dtype == torch.float32
    _close(out, want[0], "output")
    assert (float(lo), float(hi)) == tuple(float(m) for m in torch.aminmax(out))  # the range handed on: exact
    _close(rm_got, want[1], "running mean")
    _close(rv_got, want[2], "running variance")
    if relu:  # the mask: out <= 0, a bit per element in memory order
        flags = bits.unsqueeze(1).bitwise_and(native.conv_bn._BIT_WEIGHTS).ne(0).view(-1)[:out.numel()]
        assert torch.equal(flags, fracpass.quant.memory_order(out) <= 0)
    else:
        assert bits is None
    dy, (mn, mx), g_res, d_w, d_b = native.conv_bn._fast_bn_backward(ext, grad, bits, v, ref, scale, bias, w, mean, invstd,
                                                             training, residual)
    _close(dy, want[3], "dL/dy")
    assert float(mn) == float(dy.min()) and float(mx) == float(dy.max())
    _close(d_w, want[4], "dL/d weight")
    _close(d_b, want[5], "dL/d bias")
    if residual:
        _close(g_res, want[6], "dL/d residual")


def test_a_nan_in_the_gradient_gives_a_nan_range_as_aminmax_does():
    g = torch.Generator().manual_seed(0)
    shape = (2, 16, 4, 4)
    v = _product(shape, 0.0, g)
    one, zero = torch.ones(16), torch.zeros(16)
    ext = native.units.ext(v)
    out, bits, ref, mean, invstd, (lo, hi) = native.conv_bn._fast_bn_forward(ext, v, one, zero, one, zero, None,
                                                                     (None, None, True, 0.1, 1e-5, False))
    assert not lo.isnan() and not hi.isnan()
    grad = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    grad[1, 3, 2, 2] = float("nan")
    dy, (mn, mx), *_ = native.conv_bn._fast_bn_backward(ext, grad, bits, v, ref, one, zero, one, mean, invstd, True, False)
    want = torch.aminmax(dy)
    assert mn.isnan() and mx.isnan() and want.min.isnan()


@pytest.mark.parametrize("relu", [True, False])
def test_a_nan_in_the_output_gives_a_nan_range_as_aminmax_does(relu):
    g = torch.Generator().manual_seed(0)
    shape = (2, 6, 3, 5)  # 180 elements: 11 vectors of 16 and a scalar tail of 4 (the last pixel's last channels)
    v = _product(shape, 0.0, g)
    one, zero = torch.ones(6), torch.zeros(6)
    ext = native.units.ext(v)
    for where in ((0, 3, 1, 1), (1, 5, 2, 4)):  # in a vector, in the tail
        res = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        res[where] = float("nan")
        out, *_, (lo, hi) = native.conv_bn._fast_bn_forward(ext, v, one, zero, one, zero, res,
                                                    (None, None, True, 0.1, 1e-5, relu))
        want = torch.aminmax(out)
        assert want.min.isnan() and lo.isnan() and hi.isnan()


class Block(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)) + x)
        return self.head(out.mean((2, 3)))


def _train(qmodel, x, steps, seed=5):
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05)
    losses = []
    for k in range(steps):
        torch.manual_seed(seed + k)
        loss = nn.functional.cross_entropy(qmodel(x), torch.arange(x.shape[0]) % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("weight_scale", ["tensor", "channel"])
def test_the_fused_model_matches_the_aten_route(weight_scale, monkeypatch):
    torch.manual_seed(0)
    model = Block().to(memory_format=torch.channels_last)
    x = torch.randn(8, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    plan = fracpass.Plan.static(8, 8, 8, rules=[fracpass.Rule(weight_scale=weight_scale)])
    fast = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=OPTS)
    aten = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=OPTS.replace(fast_bn=False))
    assert aten.graph.nodes.__len__() == fast.graph.nodes.__len__()
    runs = {}
    for name, qmodel in (("fast", fast), ("aten", aten)):
        xx = x.clone().requires_grad_()
        torch.manual_seed(5)
        out = qmodel(xx)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
        runs[name] = [out.detach(), xx.grad] + [p.grad for p in qmodel.parameters()] + [
            b for n, b in qmodel.named_buffers() if "running" in n and "bn" in n]
    # The routes' dL/dy differ by float32 rounding (checked against float64 above), which can move a
    # stochastic rounding decision across a level: one gradient code a step apart changes the gradients
    # before it by ~1e-3 of their size (seen with per-channel weights); a wrong BatchNorm would move them
    # by their own size. The output and the running statistics come before any such flip.
    for i, (a, b) in enumerate(zip(runs["fast"], runs["aten"])):
        tol = 1e-5 if i == 0 or i >= len(runs["fast"]) - 4 else 1e-2
        assert float((a - b).abs().max()) <= tol * float(b.abs().max()) + 1e-5, i
    # training steps: the two routes' losses stay together (float32 rounding apart; a code that flips at a
    # rounding boundary moves a loss by far less than this)
    got = _train(fast, x, 5)
    want = _train(aten, x, 5)
    assert got[-1] < got[0]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-3 * max(want), (got, want)


def test_layouts_and_scales_the_kernels_do_not_take_keep_aten(monkeypatch):
    """An NCHW product (channels not innermost) takes the aten route: bit for bit the fast_bn=False model;
    so would per-sample input scales (a gated op) and a residual in another layout."""
    import copy

    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8)  # NCHW
    qmodel = fracpass.transform(Block(), fracpass.Plan.static(8, 8, 8), example_inputs=(x,), execution="native", native=OPTS)
    twin = copy.deepcopy(qmodel)
    seen = []
    real = native.conv_bn._fast_bn_forward
    monkeypatch.setattr(native.conv_bn, "_fast_bn_forward", lambda *a: seen.append(1) or real(*a))
    got = qmodel(x)
    assert not seen and any(n.target in (r.fn for r in native.calls.CALLS.values() if r.is_fused) for n in qmodel.graph.nodes)
    fracpass.native.configure(twin, OPTS.replace(fast_bn=False))
    assert torch.equal(twin(x), got)
    v = torch.zeros(4, 16, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    one = torch.ones(1)
    assert native.conv_bn._fast_bn_layout(v, one, None)
    assert not native.conv_bn._fast_bn_layout(v, torch.ones(4), None)  # per-sample scales
    assert not native.conv_bn._fast_bn_layout(v, one, torch.zeros(4, 16, 8, 8))  # an NCHW residual
    assert not native.conv_bn._fast_bn_layout(v.contiguous(), one, None)


def test_one_value_per_channel_in_training_still_raises():
    model = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU()).to(memory_format=torch.channels_last)
    x = torch.randn(1, 16, 1, 1).contiguous(memory_format=torch.channels_last)
    qmodel = fracpass.transform(model, fracpass.Plan.static(8, 8, 8), example_inputs=(torch.randn(2, 16, 1, 1),),
                                execution="native", native=OPTS)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        qmodel(x)


def test_op_paths_say_how_each_fused_batchnorm_ran(monkeypatch):
    """op_paths tells a user which kernels a fused convolution's BatchNorm took at the last call, and how
    to get the fast ones, or why it ran unfused."""
    from test_fuse_native_bn import FrozenStatsBN

    torch.manual_seed(0)
    plan = fracpass.Plan.static(8, 8, 8)
    x = torch.randn(4, 16, 8, 8)
    cl = fracpass.transform(Block().to(memory_format=torch.channels_last), plan, execution="native", native=OPTS,
                            example_inputs=(x.contiguous(memory_format=torch.channels_last),))
    cl(x.contiguous(memory_format=torch.channels_last))
    assert native.op_paths(cl)["conv1"][1].endswith("BatchNorm fused, on the CPU kernels")
    nchw = fracpass.transform(Block(), plan, example_inputs=(x,), execution="native", native=OPTS)
    nchw(x)
    assert "on aten's kernels (an NCHW product: a channels_last model and input put it on the CPU kernels)" in \
        native.op_paths(nchw)["conv1"][1]
    fracpass.native.configure(cl, OPTS.replace(fast_bn=False))
    cl(x.contiguous(memory_format=torch.channels_last))
    assert "NativeOptions.fast_bn is False" in native.op_paths(cl)["conv2"][1]
    model = Block()
    model.bn1 = FrozenStatsBN(16)  # a subclass with its own forward: the fused op leaves it to itself
    sub = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=OPTS,
                              leaf_modules=[FrozenStatsBN])
    sub(x)
    assert "its BatchNorm runs unfused: its BatchNorm is a FrozenStatsBN" in native.op_paths(sub)["conv1"][1]


def _unwired(qmodel):
    """``qmodel`` with the Handover taken out of the graph: readers scan their input themselves."""
    for node in list(qmodel.graph.nodes):
        if "handed" in node.kwargs:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "handed"}
    for node in list(qmodel.graph.nodes):
        if "give" in node.kwargs:
            out, handover = sorted(node.users, key=lambda u: u.args[1])
            out.replace_all_uses_with(node)
            qmodel.graph.erase_node(out)
            qmodel.graph.erase_node(handover)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "give"}
    qmodel.graph.lint()
    qmodel.recompile()
    return qmodel


def test_the_next_quantizer_takes_the_fused_outputs_range_without_a_pass(monkeypatch):
    """The fused op hands its output's min and max (from the pass that wrote it) to the next convolution's
    activation quantizer as a value in the graph (conv_bn.Handover): the same model with that edge taken
    out computes the same outputs, gradients and quantizer ranges bit for bit, with one scan per
    handed-over tensor more."""
    import copy
    from fracpass import quant

    torch.manual_seed(0)
    model = Block().to(memory_format=torch.channels_last)
    x = torch.randn(8, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    qmodel = fracpass.transform(model, fracpass.Plan.static(6, 6, 8), example_inputs=(x,), execution="native", native=OPTS)
    nodes = {n.name: n for n in qmodel.graph.nodes}
    # conv1's fused call returns (out, Handover); conv2's call reads out and takes the Handover
    assert nodes["conv2"].args[0] is nodes["conv1_out"] and nodes["conv2"].kwargs["handed"] is nodes["conv1_handover"]
    assert nodes["conv1"].kwargs["give"] is True and "give" not in nodes["conv2"].kwargs  # no convolution reads conv2's
    twin = _unwired(copy.deepcopy(qmodel))
    assert not any("handed" in n.kwargs for n in twin.graph.nodes)
    real_aminmax = torch.aminmax

    def run(m):
        scans = []
        monkeypatch.setattr(quant.torch, "aminmax", lambda t, **k: scans.append(t.numel()) or real_aminmax(t, **k))
        xx = x.clone().requires_grad_()
        torch.manual_seed(5)
        out = m(xx)
        out.sum().backward()
        monkeypatch.setattr(quant.torch, "aminmax", real_aminmax)
        state = [b for n, b in m.named_buffers() if "running_m" in n]
        return [out.detach(), xx.grad] + [p.grad for p in m.parameters()] + state, scans

    got, handed = run(qmodel)
    want, scanned = run(twin)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # conv2's input is bn1-relu's output (8 x 16 x 12 x 12): scanned without the hand-over only
    assert sorted(scanned) == sorted(handed + [x.numel()])


class _Writes(nn.Module):
    """conv1-bn1-relu's output read by conv2 and by ``reader``, which may write it in place."""

    def __init__(self, reader: str):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.reader = reader
        self.relu_ = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        if self.reader == "pool":  # makes a new tensor: the range holds for conv2
            other = self.pool(a)
        elif self.reader == "add_":  # written in place (after conv2 reads it here: the order is not relied on)
            other = a.add_(1)
        elif self.reader == "view":  # a view, which a later op could write through
            other = a.permute(0, 2, 3, 1)
        else:  # an in-place module
            other = self.relu_(a)
        return self.conv2(a).sum() + other.sum()


@pytest.mark.parametrize("reader,wired", [("pool", True), ("add_", False), ("view", False), ("relu_", False)])
def test_a_range_is_handed_over_only_where_nothing_can_write_the_tensor(reader, wired):
    """The pass wires the Handover only where every reader of the fused output provably leaves it as it is;
    where one may write it (an in-place method or module, a view), the reader scans its input itself."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    model = _Writes(reader).to(memory_format=torch.channels_last)
    qmodel = fracpass.transform(model, fracpass.Plan.static(8, 8, 8), example_inputs=(x,), execution="native",
                                native=OPTS)
    assert any(n.kwargs.get("handed") is not None for n in qmodel.graph.nodes) == wired
    assert qmodel.graph.find_nodes(op="call_function", target=native.calls.bf16_conv2d_bn)  # fused either way
    qmodel(x).backward()
