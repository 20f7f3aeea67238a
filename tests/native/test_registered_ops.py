"""Native products as registered torch ops (issue 27): fracpass::int8_mm / int8_mm_backward (linear layers, 2-D
matmuls), fracpass::bf16_mm / bf16_mm_backward (batched products), fracpass::gated_linear / gated_linear_backward
(gated linear layers), fracpass::gated_bmm / gated_bmm_backward (gated batched products),
fracpass::int8_conv2d / int8_conv2d_backward (the opt-in int8 conv2d forward), fracpass::bf16_conv /
bf16_conv_backward (convolutions of every kind on bf16 codes, static and gated) and fracpass::bf16_conv_bn /
bf16_conv_bn_backward (such a convolution with the BatchNorm, residual add and ReLU after it), with fakes and
their autograd registered, pass torch.library.opcheck, and native calls run through them."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native
from fracpass.quant import draw_seed
from torch.utils._python_dispatch import TorchDispatchMode

UNITS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_int8", "amx_bf16"})


@pytest.fixture(autouse=True)
def units_claimed(monkeypatch):
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: UNITS)


def _ranges(x, per_row):
    if per_row:
        return x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    return x.min(), x.max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("b_rows, per_channel", [(True, True), (True, False), (False, False)])
def test_int8_mm_and_its_backward_pass_opcheck(bits, b_rows, per_channel):
    torch.manual_seed(0)
    a = torch.randn(12, 24, requires_grad=True)
    b = torch.randn(16, 24) if b_rows else torch.randn(24, 16)
    b.requires_grad_()
    bias = torch.randn(16, requires_grad=True) if b_rows else None
    args = (a, b, bias, *_ranges(a.detach(), False), bits, *_ranges(b.detach(), per_channel), bits, b_rows, 8,
            [False, False, False])
    torch.library.opcheck(torch.ops.fracpass.int8_mm.default, args)
    out = torch.ops.fracpass.int8_mm(*args)
    grad = torch.randn(12, 16)
    for needs in ([True, True, bias is not None], [True, False, False], [False, True, False]):
        back = (grad, *[t.detach() for t in out[1:]], b_rows, 8, [False, False, False], needs, draw_seed())
        torch.library.opcheck(torch.ops.fracpass.int8_mm_backward.default, back)


def test_the_backward_op_is_deterministic_in_its_seed_and_draws_as_the_simulation():
    torch.manual_seed(0)
    a, b = torch.randn(8, 32), torch.randn(32, 8)
    out = torch.ops.fracpass.int8_mm(a, b, None, a.min(), a.max(), 8, b.min(), b.max(), 8, False, 6,
                                     [False, False, False])
    grad, seed = torch.randn(8, 8), draw_seed()
    back = lambda s: torch.ops.fracpass.int8_mm_backward(grad, *out[1:], False, 6, [False, False, False],
                                                         [True, True, False], s)
    first, again = back(seed), back(seed.clone())
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    other = back(seed + 1)
    assert not torch.equal(first[0], other[0])


def test_a_native_linear_layer_runs_on_the_registered_ops_and_equals_its_simulation_at_8_bits():
    """Per-tensor weights: every product on int8, within float32 rounding of the simulation (same noise)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 8)), torch.randn(64, 48)
    plan = fracpass.Plan.static(8, 8, 8, rules=[fracpass.Rule(weight_scale="tensor")])
    options = fracpass.NativeOptions(min_intensity=0.0)
    sim = fracpass.transform(model, plan, example_inputs=(x,))
    nat = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=options)
    assert "native_linear" in nat.code
    grads, seen = [], []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    for q in (sim, nat):
        torch.manual_seed(3)
        with Ops() if q is nat else contextlib.nullcontext():
            q(x).square().sum().backward()
        grads.append([p.grad for p in q.parameters()])
    assert seen.count("fracpass.int8_mm.default") == 2 and seen.count("fracpass.int8_mm_backward.default") == 2
    for g, w in zip(*reversed(grads)):
        assert float((g - w).abs().max()) <= 1e-5 * float(w.abs().max())
    assert native.product_paths(nat)["_0"] == ("int8", "int8", "int8")


@pytest.mark.parametrize("shapes", [((2, 3, 8, 16), (2, 3, 16, 8)), ((4, 8, 16), (16, 6)), ((3, 5, 16), (1, 16, 7))])
def test_bf16_mm_and_its_backward_pass_opcheck(shapes):
    torch.manual_seed(0)
    a, b = (torch.randn(*s, requires_grad=True) for s in shapes)
    args = (a, b, a.detach().min(), a.detach().max(), 63.0, b.detach().min(), b.detach().max(), 255.0, 6)
    torch.library.opcheck(torch.ops.fracpass.bf16_mm.default, args)
    out = torch.ops.fracpass.bf16_mm(*args)
    grad = torch.randn(out[0].shape)
    for needs in ([True, True], [True, False], [False, True]):
        back = (grad, *[t.detach() for t in out[1:]], 6, needs, draw_seed())
        torch.library.opcheck(torch.ops.fracpass.bf16_mm_backward.default, back)


class Attention(nn.Module):
    """q k^T and P v written as matmuls: batched products on the bf16 path."""

    def __init__(self, d=32):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        p = torch.softmax(q @ k.transpose(-2, -1) / 32**0.5, dim=-1)
        return p @ v


def test_batched_products_run_on_the_registered_ops_as_the_autograd_function_did():
    """The op's values equal the simulation's within bfloat16 rounding, and it is what runs."""
    torch.manual_seed(0)
    model, x = Attention(), torch.randn(4, 24, 32)
    plan = fracpass.Plan.static(8, 8, 8)
    options = fracpass.NativeOptions(min_intensity=0.0, min_bmm_intensity=0.0)
    sim = fracpass.transform(model, plan, example_inputs=(x,))
    nat = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=options)
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    outs = []
    for q in (sim, nat):
        torch.manual_seed(3)
        xx = x.clone().requires_grad_()
        with Ops() if q is nat else contextlib.nullcontext():
            y = q(xx)
            y.square().sum().backward()
        outs.append((y.detach(), xx.grad))
    assert seen.count("fracpass.bf16_mm.default") == 2 and seen.count("fracpass.bf16_mm_backward.default") == 2
    assert {runs[0] for name, runs in native.product_paths(nat).items() if "matmul" in name} == {"bf16"}
    for got, want in zip(*reversed(outs)):  # two bf16 products deep, each output rounded once (u = 2^-8)
        assert float((got - want).abs().max()) <= 4 * 2.0**-8 * float(want.abs().max())


def _recorded_pair(monkeypatch, module, forward: str, backward: str, step):
    """The arguments of every call of ``module.forward`` and ``module.backward`` (a product's forward and
    backward op, called through the module's names) while ``step()`` runs: the forward's as leaves off the
    step's graph (their requires_grad kept), the backward's detached (as a backward gets them)."""
    calls = {forward: [], backward: []}
    for name in calls:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, name=name, real=real: calls[name].append(a) or real(*a))
    step()
    leaf = lambda a: a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
    detached = lambda a: a.detach() if isinstance(a, torch.Tensor) else a
    return ([tuple(leaf(a) for a in args) for args in calls[forward]],
            [tuple(detached(a) for a in args) for args in calls[backward]])


@pytest.mark.parametrize("weight_scale", ["channel", "tensor"])
def test_the_gated_linear_product_and_its_backward_pass_opcheck_and_run_through_the_ops(weight_scale, monkeypatch):
    """fracpass::gated_linear / gated_linear_backward (a gated linear layer on bf16 codes with per-sample
    scales): opcheck on the arguments a gated layer gives them in a training step, the gate's gradient
    among their outputs; the layer runs through them."""
    from test_gated import _gated_pair
    from test_native import Lin

    torch.manual_seed(0)
    x = torch.rand(8, 5, 96) * 3 - 0.5
    x = x * torch.linspace(-3, 3, 8).view(-1, 1, 1)  # samples of different spans: the gates choose apart
    _, nat = _gated_pair(Lin(96, 80), (x,), weight_scale=weight_scale,
                         opts=fracpass.NativeOptions(min_intensity=0.0, channels_last=False))
    forwards, backwards = _recorded_pair(monkeypatch, native.gated, "gated_linear_op", "gated_linear_backward",
                                         lambda: nat(x.requires_grad_()).square().mean().backward())
    assert len(forwards) == 1 and len(backwards) == 1
    (args,), (back,) = forwards, backwards
    assert back[15] == [True, True, True, True]  # needs: x, weight, bias and the gate's one-hot choice
    torch.library.opcheck(torch.ops.fracpass.gated_linear.default, args)
    torch.library.opcheck(torch.ops.fracpass.gated_linear_backward.default, back)


@pytest.mark.parametrize("case", ["scores", "bmm"])
def test_the_gated_batched_product_and_its_backward_pass_opcheck(case, monkeypatch):
    """fracpass::gated_bmm / gated_bmm_backward (attention's q k^T and P v, or a bmm, in a gated block):
    opcheck on the arguments a gated product gives them in a training step, the gate's gradient among
    their outputs."""
    from test_bf16_mm import _gated_case, _gated_pair

    torch.manual_seed(0)
    model, inputs = _gated_case(case)
    _, nat = _gated_pair(model, inputs)
    forwards, backwards = _recorded_pair(
        monkeypatch, native.bf16_mm, "gated_bmm", "gated_bmm_backward",
        lambda: nat(*(x.clone().requires_grad_() for x in inputs)).square().mean().backward())
    assert len(forwards) == 1 and len(backwards) == 1
    (args,), (back,) = forwards, backwards
    assert back[17] == [True, True, True]  # needs: a, b and the gate's one-hot choice
    torch.library.opcheck(torch.ops.fracpass.gated_bmm.default, args)
    torch.library.opcheck(torch.ops.fracpass.gated_bmm_backward.default, back)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_int8_conv2d_forward_and_its_backward_pass_opcheck(bits, monkeypatch):
    """fracpass::int8_conv2d / int8_conv2d_backward (the opt-in "conv2d_int8" kind: conv2d's forward on
    oneDNN's int8 convolution, 8-bit weights shifted): opcheck on the arguments a native call gives them in
    a training step, channels-last and NCHW."""
    for layout in (torch.channels_last, torch.contiguous_format):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2))
        x = torch.randn(4, 8, 10, 10).contiguous(memory_format=layout)
        q = fracpass.transform(model.to(memory_format=layout), fracpass.Plan.static(bits, bits, 8), example_inputs=(x,),
                               execution="native", native=fracpass.NativeOptions(kinds=native.KINDS, min_conv_macs=0,
                                                                                 channels_last=False))
        with monkeypatch.context() as mp:
            forwards, backwards = _recorded_pair(mp, native.int8_conv2d, "int8_conv2d", "int8_conv2d_backward",
                                                 lambda: q(x.clone().requires_grad_()).square().mean().backward())
        assert len(forwards) == 2 and len(backwards) == 2
        for args, back in zip(forwards, backwards[::-1]):
            torch.library.opcheck(torch.ops.fracpass.int8_conv2d.default, args)
            torch.library.opcheck(torch.ops.fracpass.int8_conv2d_backward.default, back)


BF16_CONVS = {
    "conv2d, channels_last": (lambda: nn.Conv2d(8, 16, 3, padding=1), (4, 8, 10, 10), torch.channels_last),
    "conv2d, NCHW, strided": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (4, 8, 10, 10), torch.contiguous_format),
    "conv1d, grouped": (lambda: nn.Conv1d(8, 16, 5, groups=4, padding=2), (4, 8, 40), torch.contiguous_format),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1), (4, 8, 6, 6), torch.contiguous_format),
}


@pytest.mark.parametrize("weight_scale", ["channel", "tensor"])
@pytest.mark.parametrize("case", sorted(BF16_CONVS))
def test_the_bf16_convolution_and_its_backward_pass_opcheck_and_run_through_the_ops(case, weight_scale, monkeypatch):
    """fracpass::bf16_conv / bf16_conv_backward: opcheck on the arguments a native convolution gives them in a
    training step (the input codes kept as bytes, per-tensor and per-channel weights, transposed and grouped
    ones); the step runs through them, once each."""
    factory, shape, layout = BF16_CONVS[case]
    torch.manual_seed(0)
    conv = factory().to(memory_format=layout) if len(shape) == 4 else factory()
    x = torch.randn(*shape).contiguous(memory_format=layout) if len(shape) == 4 else torch.randn(*shape)
    plan = fracpass.Plan.static(6, 6, 6, rules=[fracpass.Rule(weight_scale=weight_scale)])
    kinds = ("conv", "conv_transpose")
    q = fracpass.transform(nn.Sequential(conv), plan, example_inputs=(x,), execution="native",
                           native=fracpass.NativeOptions(kinds=kinds, min_conv_macs=0, channels_last=False))
    forwards, backwards = _recorded_pair(monkeypatch, native.bf16_conv, "bf16_conv", "bf16_conv_backward",
                                         lambda: q(x.clone().requires_grad_()).square().mean().backward())
    assert len(forwards) == 1 and len(backwards) == 1
    (args,), (back,) = forwards, backwards
    assert back[25] == [True, True, True, False]  # needs: x, weight, bias; no gate
    torch.library.opcheck(torch.ops.fracpass.bf16_conv.default, args)
    torch.library.opcheck(torch.ops.fracpass.bf16_conv_backward.default, back)


def test_the_gated_bf16_convolution_and_its_backward_pass_opcheck(monkeypatch):
    """The gated form: per-sample scales, the gate's gradient among the backward's outputs."""
    from test_gated import _gated_pair, _spread

    torch.manual_seed(0)
    inputs = _spread((torch.randn(8, 6, 8, 8),))
    _, nat = _gated_pair(nn.Sequential(nn.Conv2d(6, 8, 3, padding=1)), inputs,
                         opts=fracpass.NativeOptions(min_conv_macs=0, channels_last=False))
    forwards, backwards = _recorded_pair(monkeypatch, native.bf16_conv, "bf16_conv", "bf16_conv_backward",
                                         lambda: nat(inputs[0].clone().requires_grad_()).square().mean().backward())
    assert len(forwards) == 1 and len(backwards) == 1
    (args,), (back,) = forwards, backwards
    assert args[20] is not None and back[25] == [True, True, True, True]  # gated: the choice, and the gate's gradient
    torch.library.opcheck(torch.ops.fracpass.bf16_conv.default, args)
    torch.library.opcheck(torch.ops.fracpass.bf16_conv_backward.default, back)


def test_a_handed_over_input_gradient_is_refused_under_tracing_with_what_to_do():
    """bf16_conv_backward hands dx to a fused op's placeholders only eagerly (whether it can is decided from
    values): its fake says so instead of giving shapes that may not hold."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        grad, keep = torch.empty(2, 4, 6, 6), torch.empty(2, 4, 6, 6, dtype=torch.uint8)
        qw, s = torch.empty(4, 4, 3, 3, dtype=torch.bfloat16), torch.empty(1)
        args = (grad, keep, s, qw, s, grad, grad, torch.zeros(()), True, True, 0.0, [1, 1], [1, 1], [1, 1], False,
                [0, 0], 1, 6, None, None, None, None, None, False, None, [True, True, False, False])
        with pytest.raises(NotImplementedError, match="only in eager execution.*without take_"):
            torch.ops.fracpass.bf16_conv_backward(*args, [2, 4, 6, 6], list(grad.stride()), None)
        assert torch.ops.fracpass.bf16_conv_backward(*args, [], [], None)[0].shape == grad.shape


class Block(nn.Module):
    """conv-BN-ReLU, then conv-BN, the residual add and a ReLU: two fused calls, the second with a residual."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


@pytest.mark.parametrize("layout", ["channels_last", "NCHW"])  # the BatchNorm on the CPU kernels, on aten's
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_fused_conv_batchnorm_and_its_backward_pass_opcheck(layout, mode, monkeypatch):
    """fracpass::bf16_conv_bn / bf16_conv_bn_backward: opcheck on the arguments a residual block's two fused
    calls give them in a training step (or an eval step's backward), without a hand-over between them
    (NativeOptions.hand_gradient off: it runs only eagerly); the block runs through them and the running
    statistics move as the module's own BatchNorm moves them."""
    memory = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    block, x = Block().to(memory_format=memory), torch.randn(4, 8, 10, 10).contiguous(memory_format=memory)
    opts = fracpass.NativeOptions(min_conv_macs=0, channels_last=False, hand_gradient=False)
    q = fracpass.transform(block, fracpass.Plan.static(6, 6, 6), example_inputs=(x,), execution="native", native=opts)
    q.train(mode == "train")
    before = q.bn1.running_mean.clone()
    forwards, backwards = _recorded_pair(monkeypatch, native.conv_bn, "bf16_conv_bn", "bf16_conv_bn_backward",
                                         lambda: q(x.clone().requires_grad_()).square().mean().backward())
    assert len(forwards) == 2 and len(backwards) == 2
    assert (forwards[1][29] is not None) and (forwards[0][29] is None)  # the second takes the residual
    assert not torch.equal(q.bn1.running_mean, before) if mode == "train" else torch.equal(q.bn1.running_mean, before)
    for args, back in zip(forwards, backwards[::-1]):
        # opcheck's AOT check seeds the forward only (freeze_rng_state restores the generator after it), so its eager
        # and its compiled backward draw the gradient's rounding from different generator states. BatchNorm's
        # backward makes dL/dy uneven, so the two draws round it apart (bf16_conv's check above agrees only because
        # the gradient of a sum reaches it even: every element one value). That check runs with the gradient unrounded.
        rounded = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(torch.ops.fracpass.bf16_conv_bn.default, args, test_utils=rounded)
        unrounded = args[:19] + (32,) + args[20:]  # gbits
        torch.library.opcheck(torch.ops.fracpass.bf16_conv_bn.default, unrounded, test_utils="test_aot_dispatch_dynamic")
        torch.library.opcheck(torch.ops.fracpass.bf16_conv_bn_backward.default, back)
