"""A fused BatchNorm's backward taking the next convolution's input-gradient product unscaled (conv_bn.Handover).

Where a fused conv-BN(-ReLU) output's only reader is a 2-D convolution (FuseNativeBNPass wires the fused
call with ``give=True``), the convolution's int8 input-gradient product goes to the fused op's backward as the
bfloat16 product with its epilogue (scale, addend), the gradients of the Handover's placeholders, instead of
as float32 dx, and the BatchNorm kernels form dx where they read it (fracpass.NativeOptions.hand_gradient). The values are scale_bf16's: every gradient must be
bit for bit the one with the hand-over off. Checked here: the kernel against scale_bf16 then the float32
kernel (with and without the ReLU's mask, vector tails, an addend or none), the graph marks (only sole
readers, read once), whole ResNets at two stages, and that no placeholder reaches any other reader.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native

# channels_last=False: each test's layout as given (test_layout.py checks the default conversion)
OPTS = fracpass.NativeOptions(min_conv_macs=0, channels_last=False)  # small convolutions on the bf16 path; fast_bn on (the default)

CL = torch.channels_last


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    if native.bf16_support() is not None or native.units.ext() is None:
        pytest.skip("no bf16 convolutions, CPU kernels or int8 units here: the hand-over does not run")


def _bn_inputs(shape, relu, generator):
    n, c = shape[0], shape[1]
    v = (torch.randn(shape, generator=generator) * 20 + 5).round().to(torch.bfloat16).contiguous(memory_format=CL)
    bits = torch.randint(0, 256, ((v.numel() + 7) // 8,), generator=generator, dtype=torch.uint8) if relu else None
    ref = v.permute(0, 2, 3, 1).reshape(-1, c)[0].float().contiguous()
    scale, bias = torch.rand(c, generator=generator) + 0.5, torch.randn(c, generator=generator)
    w, mean, invstd = torch.rand(c, generator=generator) + 0.5, torch.randn(c, generator=generator).double(), \
        (torch.rand(c, generator=generator) + 0.1).double()
    return v, bits, ref, scale, bias, w, mean, invstd


@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (3, 24, 5, 6), (2, 64, 4, 4), (5, 8, 3, 2)])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("addend", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_the_kernel_forms_the_gradient_as_scale_bf16_writes_it(shape, relu, addend, training):
    """bn_backward_bf16 on a bf16 product with its scale and addend: every output equal to the float32
    route's on scale_bf16's gradient (the addend needs one sample of a multiple of 16 values)."""
    ext = native.units.ext()
    g = torch.Generator().manual_seed(sum(shape) + 2 * relu + addend)
    v, bits, ref, scale, bias, w, mean, invstd = _bn_inputs(shape, relu, g)
    y = (torch.randn(shape, generator=g) * 300).to(torch.bfloat16).contiguous(memory_format=CL)
    sc = torch.tensor([0.0123])
    per_row = y.numel() // y.shape[0]
    add = torch.randn((1,) + shape[1:], generator=g).contiguous(memory_format=CL) if addend else None
    if addend and per_row % 16:
        with pytest.raises(RuntimeError, match="a multiple of 16"):
            ext.bn_backward_bf16(y, native.codes.NONE_B if bits is None else bits, v, ref, scale, bias, w, mean, invstd,
                                 training, False, sc, fracpass.quant.memory_order(add))
        return
    dx = ext.scale_bf16(y, sc, native.codes.NONE_F, native.codes.NONE_F, native.codes.NONE_F if add is None else fracpass.quant.memory_order(add))
    mask = native.codes.NONE_B if bits is None else bits
    want = ext.bn_backward_bf16(dx, mask, v, ref, scale, bias, w, mean, invstd, training, False, native.codes.NONE_F,
                                native.codes.NONE_F)
    got = ext.bn_backward_bf16(y, mask, v, ref, scale, bias, w, mean, invstd, training, False, sc,
                               native.codes.NONE_F if add is None else fracpass.quant.memory_order(add))
    for a, b in zip(got[:3] + got[4:], want[:3] + want[4:]):  # dy, its min and max, dw, db (not the given grad)
        assert torch.equal(a, b)


def test_the_kernel_refuses_to_keep_a_handed_product():
    ext = native.units.ext()
    v, bits, ref, scale, bias, w, mean, invstd = _bn_inputs((2, 16, 4, 4), True, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="cannot be kept"):
        ext.bn_backward_bf16(v, bits, v, ref, scale, bias, w, mean, invstd, True, True, torch.ones(1), native.codes.NONE_F)


def _native(model, x, stage=3, weight_scale="tensor"):
    plan = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8))
    plan = dataclasses.replace(plan, rules=(fracpass.Rule(weight_scale=weight_scale),))
    q = fracpass.transform(model, plan, example_inputs=(x[:2],), execution="native", native=OPTS).to(memory_format=CL)
    fracpass.set_stage(q, stage)
    return q


def _marked(q):
    return [n for n in q.graph.nodes if n.op == "call_function" and n.kwargs.get("give")]


def _grads(q, x, y, monkeypatch, on):
    fracpass.native.configure(q, OPTS.replace(hand_gradient=on))
    puts = []
    real = native.int8_conv.takes
    monkeypatch.setattr(native.int8_conv, "takes", lambda *a: (lambda t: (t and puts.append(1), t)[1])(real(*a)))
    q.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the gradient quantizers' dither
    nn.functional.cross_entropy(q(x), y).backward()
    return {n: p.grad.clone() for n, p in q.named_parameters()}, len(puts)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_resnet_trains_bit_for_bit_with_and_without_the_hand_over(stage, monkeypatch):
    """ResNet-20, per-tensor weights, channels-last: each block's second convolution hands its input
    gradient's product to the first's BatchNorm (9 of them), and every parameter's gradient is the same."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (8,))
    q = _native(fracpass.models.resnet20().train(), x, stage)
    marked = _marked(q)
    assert len(marked) == 9 and all(n.target is native.calls.bf16_conv2d_bn and len(n.users) == 2 for n in marked)
    for n in marked:  # (out, Handover): out read by one convolution, which takes the Handover
        out, handover = sorted(n.users, key=lambda u: u.args[1])
        assert len(out.users) == 1 and list(handover.users) == list(out.users)
        assert next(iter(out.users)).kwargs["handed"] is handover
    on, handed = _grads(q, x, y, monkeypatch, True)
    off, none = _grads(q, x, y, monkeypatch, False)
    assert handed == 9 and none == 0
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on), \
        [k for k in on if not torch.equal(on[k], off[k])]


def test_per_channel_weights_hand_nothing_over_and_train_the_same(monkeypatch):
    """A per-channel weight scale keeps dx off the int8 product (its scale lies on the contracted axis):
    no hand-over, the marks notwithstanding."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (4,))
    q = _native(fracpass.models.resnet20().train(), x, 3, weight_scale="channel")
    on, handed = _grads(q, x, y, monkeypatch, True)
    off, _ = _grads(q, x, y, monkeypatch, False)
    assert handed == 0 and all(torch.equal(on[k], off[k]) for k in on)


class _Shared(nn.Module):
    """conv1-bn1-relu's output read by two convolutions (conv2, conv3), then by conv4 twice (as its input
    and as the fused residual), then by conv5 alone."""

    def __init__(self):
        super().__init__()
        conv = lambda: nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.conv1, self.conv2, self.conv3, self.conv4, self.conv5 = conv(), conv(), conv(), conv(), conv()
        self.bn1, self.bn2, self.bn3, self.bn4, self.bn5 = (nn.BatchNorm2d(16) for _ in range(5))
        self.conv0, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)

    def forward(self, x):
        a = torch.relu(self.bn0(self.conv0(x)))
        b = torch.relu(self.bn1(self.conv1(a)))
        c = torch.relu(self.bn2(self.conv2(b))) + torch.relu(self.bn3(self.conv3(b)))  # b read twice
        d = torch.relu(self.bn4(self.conv4(c)))
        e = torch.relu(self.bn5(self.conv5(d)) + d)  # d read by conv5 and as its residual
        return e.mean((2, 3))


def test_only_a_sole_reader_that_reads_once_is_marked(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=CL)
    q = _native(_Shared().train(), x)
    marked = {n.name for n in _marked(q)}
    # conv1 reads a (conv0's fused output, read only by it); conv2/conv3 share b; conv4 reads the add c;
    # conv5 reads d twice (input and residual)
    assert marked == {"conv0"}, marked
    y = torch.randint(0, 16, (4,))
    on, handed = _grads(q, x, y, monkeypatch, True)
    off, _ = _grads(q, x, y, monkeypatch, False)
    assert handed == 1 and all(torch.equal(on[k], off[k]) for k in on)


def test_the_placeholder_never_reaches_another_reader(monkeypatch):
    """Every gradient a fused op's backward reads is either a real float32 one or a handed-over bfloat16
    product: never the zeros of a placeholder."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (8,))
    q = _native(fracpass.models.resnet20().train(), x)
    seen = []
    real = native.conv_bn._fast_bn_backward

    def spy(ext, grad, *args):
        seen.append(grad.dtype == torch.bfloat16 or grad.stride() != (0, 0, 0, 0))
        return real(ext, grad, *args)

    monkeypatch.setattr(native.conv_bn, "_fast_bn_backward", spy)
    _grads(q, x, y, monkeypatch, True)
    assert len(seen) == 21 and all(seen)


def test_no_value_in_the_graph_carries_state_on_the_tensor():
    """What the fused ops hand on (ranges, gradient placeholders) are values in the graph: after a training
    forward of ResNet-20 with every hand-over running, no node's tensor has anything in its ``__dict__``
    (fracpass once kept a handed range and a gradient hand-over there)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=CL)
    q = _native(fracpass.models.resnet20().train(), x)
    carried = {}

    class Look(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            for t in (value if isinstance(value, tuple) else (value,)):
                for item in (t if isinstance(t, tuple) else (t,)):
                    if isinstance(item, torch.Tensor) and item.__dict__:
                        carried[n.name] = sorted(item.__dict__)
            return value

    out = Look(q).run(x)
    assert carried == {}
    handovers = [n for n in q.graph.nodes if n.name.endswith("_handover")]
    assert len(handovers) == 18 and out.requires_grad
