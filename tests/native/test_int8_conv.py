"""The bf16 path's forward and input-gradient products on oneDNN's int8 convolution
(fracpass.NativeOptions.int8_forward, int8_input_grad).

A per-tensor-input, channels-last 2-D convolution multiplies the input codes' bytes u = q_a - lo (zero
point -lo, so the padding is code 0, the real zero) by the weight codes as int8, accumulating in int32:
the exact product, rounded once to bfloat16. The bf16 convolution rounds its float32 sum once too, and
that sum is exact while it stays under 2^24, so the two products are equal bit for bit there, and so is
everything computed from them. 8-bit weight codes span 256 values that need not fit int8: the few outside
it split onto copies of their input channels (csrc/native_conv.cpp, int8_weight_codes, append_channels),
or, where too many input channels hold them, those output channels run as t = q_w - k_c, and the product
is bfloat16(y + k_c S) with S the input codes' window sums (shifted_product_bf16). A stride-1 convolution's input gradient conv^T(t, q_w) is the
convolution of the gradient's codes (bytes q, zero point k) with q_w flipped and its channel axes
swapped, padded d (K - 1) - p: the same arithmetic (per-tensor weight scales; per-channel ones put the
scale on that product's contracted axis, and it runs in float32). The tests compare with a float64
convolution of the codes and with the bf16 convolution, over geometries, channel counts on and off the
kernels' vector widths, code offsets and weights that fit and that do not; then whole models with the
int8 products on and off.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native
from test_native import _saved_dtypes
from test_conv_bn import Block

# small convolutions on the bf16 path, with its int8 products (the defaults)
# channels_last=False: each test's layout as given (test_layout.py checks the default conversion)
OPTS = fracpass.NativeOptions(kinds=fracpass.native.DEFAULT_KINDS + ("conv_transpose",), min_conv_macs=0, channels_last=False)

CL = torch.channels_last


@pytest.fixture(autouse=True)
def int8_products(monkeypatch):
    if native.bf16_support() is not None or native.units.ext() is None or native.int8_support() is not None:
        pytest.skip("no bf16 convolutions, CPU kernels or int8 units here: the int8 products do not run")


def _int8(qmodel, base, on: bool):
    """A copy of ``qmodel`` with the forward and input-gradient int8 products on or off."""
    ran = copy.deepcopy(qmodel)
    return fracpass.native.configure(ran, base.replace(int8_forward=on, int8_input_grad=on))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def test_weight_codes_shift_only_the_channels_that_do_not_fit_int8():
    g = torch.Generator().manual_seed(0)
    spans = [(-128, 127), (-200, 55), (0, 255), (-255, 0), (-3, 3)]  # k_c: 0, -72, 128, -127, 0
    rows = [torch.randint(lo, hi + 1, (6, 3, 3), generator=g).float() for lo, hi in spans]
    for r, (lo, hi) in zip(rows, spans):  # each channel's codes reach both ends of its span
        r.view(-1)[:2] = torch.tensor([lo, hi], dtype=torch.float32)
    q = torch.stack(rows).to(torch.bfloat16).contiguous(memory_format=CL)  # a channels-last model's weight
    for limit in (0, 4):  # every input channel holds codes outside int8: more than 4 extra channels
        t, k, shifted, dup = native.units.ext().int8_weight_codes(q, limit)
        assert t.dtype == torch.int8 and t.is_contiguous() and t.shape == q.shape and bool(shifted)
        assert k.tolist() == [0.0, -72.0, 128.0, -127.0, 0.0] and dup.numel() == 0
        assert torch.equal(t.float() + k.view(-1, 1, 1, 1), q.float())
    fits = q[[0, 4]]
    t, k, shifted, dup = native.units.ext().int8_weight_codes(fits, 0)
    assert not bool(shifted) and not k.any() and dup.numel() == 0 and torch.equal(t.float(), fits.float())
    wide = q.float().contiguous()
    wide[1].view(-1)[:2] = torch.tensor([-200.0, 56.0])  # -200..56: 257 values
    with pytest.raises(RuntimeError, match="output channel 1's codes span 257 values"):
        native.units.ext().int8_weight_codes(wide.to(torch.bfloat16), 0)


def _split_back(t: torch.Tensor, dup: torch.Tensor, cin: int) -> torch.Tensor:
    """The codes a split weight stands for: each extra input channel added to the channel it copies."""
    q = t[:, :cin].float().clone()
    for j, c in enumerate(dup.tolist()):
        q[:, c] += t[:, cin + j].float()
    return q


def test_weight_codes_outside_int8_split_onto_copies_of_their_input_channels():
    """Codes 0..127 with 128 and 129 on input channel 2, 200 on 5 and 255 (two parts: 127 + 127 + 1) on 7 of
    12: split q = a + r1 (+ r2) onto 4 copies (2, 5, 7, 7), none padded; with one part fewer, 3 padded to 4
    with zero weights; more than the limit, or none allowed: the shift; codes down to -255: one part."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 128, (8, 12, 3, 3), generator=g).float()
    q[3, 2, 0, 1], q[0, 5, 2, 2], q[6, 7, 1, 1], q[1, 2, 2, 0] = 128, 200, 255, 129
    t, k, shifted, dup = native.units.ext().int8_weight_codes(q.to(torch.bfloat16), 4)
    assert t.dtype == torch.int8 and t.is_contiguous() and t.shape == (8, 16, 3, 3)
    assert not bool(shifted) and not k.any() and dup.tolist() == [2, 5, 7, 7]
    assert torch.equal(_split_back(t, dup, 12), q)
    assert torch.equal(t[:, :12].float(), q.clamp(-128, 127))  # the codes that fit stay where they are
    assert t[6, 14, 1, 1] == 127 and t[6, 15, 1, 1] == 1 and t[0, 13, 2, 2] == 73 and t[1, 12, 2, 0] == 2
    q[6, 7, 1, 1] = 250  # 127 + 123: one part
    t, k, shifted, dup = native.units.ext().int8_weight_codes(q.to(torch.bfloat16), 4)
    assert t.shape == (8, 16, 3, 3) and dup.tolist() == [2, 5, 7, 0] and not t[:, 15].any()
    assert torch.equal(_split_back(t, dup, 12), q)
    q[0, 9, 0, 0] = 140  # a fourth channel: 4 parts fit 4; a fifth makes 8
    assert native.units.ext().int8_weight_codes(q.to(torch.bfloat16), 4)[3].tolist() == [2, 5, 7, 9]
    q[0, 10, 0, 0] = 130
    for limit in (4, 7, 0):
        t, k, shifted, dup = native.units.ext().int8_weight_codes(q.to(torch.bfloat16), limit)
        assert bool(shifted) and dup.numel() == 0 and t.shape == q.shape
        assert torch.equal(t.float() + k.view(-1, 1, 1, 1), q)
    t, k, shifted, dup = native.units.ext().int8_weight_codes(q.to(torch.bfloat16), 8)
    assert not bool(shifted) and dup.tolist() == [2, 5, 7, 9, 10, 0, 0, 0] and torch.equal(_split_back(t, dup, 12), q)
    low = -torch.randint(0, 129, (4, 6, 1, 1), generator=g).float()
    low[2, 4, 0, 0] = -255  # -128 - 127
    t, k, shifted, dup = native.units.ext().int8_weight_codes(low.to(torch.bfloat16), 4)
    assert dup.tolist() == [4, 0, 0, 0] and t[2, 6, 0, 0] == -127 and torch.equal(_split_back(t, dup, 6), low)


@pytest.mark.parametrize("channels", [3, 16, 60, 64, 80])
def test_appended_channels_are_copies_of_the_named_ones(channels):
    """append_channels: the bytes with the named channels copied after them, channels-last, on the one-vector
    route (C + D <= 64) and the other."""
    u = torch.randint(0, 256, (5, channels, 7, 9), dtype=torch.uint8).contiguous(memory_format=CL)
    for dup in ([channels - 1], [0, channels - 1, 1 % channels, 0], list(range(min(channels, 8)))):
        got = native.units.ext().append_channels(u, torch.tensor(dup))
        assert got.is_contiguous(memory_format=CL) and torch.equal(got, torch.cat([u, u[:, dup]], 1))
    with pytest.raises(RuntimeError, match=f"channel {channels} of {channels}"):
        native.units.ext().append_channels(u, torch.tensor([channels]))
    with pytest.raises(RuntimeError, match="channels-last"):
        native.units.ext().append_channels(u.contiguous(), torch.tensor([0]))


GEOMETRIES = [g for g in itertools.product([(1, 1), (3, 3), (5, 3)], [1, 2], [0, 1, 2], [1, 2], [(7, 9), (8, 8)])
              if (g[4][0] + 2 * g[2] - g[3] * (g[0][0] - 1) - 1) >= 0 and (g[4][1] + 2 * g[2] - g[3] * (g[0][1] - 1) - 1) >= 0]
# (input channels, output channels, the input codes' lo, the weight codes' span): 3 and 24 input channels
# take the byte sums' scalar and vector loops (24: a row's 8-byte groups do not fill 64-byte vectors);
# 20 output channels leave a 4-channel tail after the 16-lane loop. Spans with codes outside int8 all over
# run shifted; "split": codes in -127..128 reaching 128 on three input and output channels; "split 255":
# codes 0..127 with 255 (two parts) and 200 on two input and output channels (_weight_codes)
VARIANTS = [(3, 16, 0, (-128, 127), 0.25, "fits", "fits"), (24, 20, -37, (-60, 195), 0.25, "shift", "shift"),
            (24, 16, -255, (0, 255), 0.25, "shift", "shift"), (3, 20, -100, (-255, 0), 0.25, "split", "shift"),
            (3, 20, -100, (-255, 0), 0, "shift", "shift"), (24, 16, -37, "split", 0.25, "split", "split"),
            (3, 20, -100, "split 255", 0.25, "split", "split")]
# ... and NativeOptions.split_channels, the routes the forward and input-gradient products take: 3 input
# channels' codes in -255..0 split (3 extra channels), or with no split allowed shift (the window sums'
# scalar loop)


def _weight_codes(span, shape, g: torch.Generator) -> torch.Tensor:
    if span == "split":
        q = torch.randint(-127, 128, shape, generator=g).float()
        q[0, 0, 0, 0] = q[1, 1, -1, -1] = q[-1, 1, 0, -1] = 128
        return q
    if span == "split 255":
        q = torch.randint(0, 128, shape, generator=g).float()
        q[0, -1, 0, 0], q[1, 0, -1, -1] = 255, 200
        return q
    return torch.randint(span[0], span[1] + 1, shape, generator=g).float()


def _route(qw: torch.Tensor, split=OPTS.split_channels) -> str:
    """How _int8_product runs these weight codes: "fits", "split" or "shift"."""
    _, _, shifted, dup = native.units.ext().int8_weight_codes(qw.to(torch.bfloat16),
                                                              native.int8_conv._split_limit(qw.shape[1], split))
    return "shift" if bool(shifted) else "split" if dup.numel() else "fits"


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_product_is_the_bf16_convolutions_product_bit_for_bit(variant, monkeypatch):
    """_int8_product against a float64 convolution of the codes rounded once to bfloat16 and against the
    bf16 convolution, over kernel sizes, strides, paddings, dilations and odd sizes (sums under 2^24)."""
    cin, cout, lo, span, split, forward_route, dx_route = variant
    g = torch.Generator().manual_seed(cin + cout - lo)
    cases = 0
    for (kh, kw), s, p, d, (h, w) in GEOMETRIES:
        qa = torch.randint(lo, lo + 256, (4, cin, h, w), generator=g).float().contiguous(memory_format=CL)
        qw = _weight_codes(span, (cout, cin, kh, kw), g)
        assert _route(qw, split) == forward_route
        conv = ([s, s], [p, p], [d, d], False, [0, 0], 1)
        u = (qa - lo).to(torch.uint8).contiguous(memory_format=CL)
        got = native.int8_conv.int8_product((u, float(lo)), qw.to(torch.bfloat16), conv, split)
        exact = torch.ops.aten.convolution(qa.double(), qw.double(), None, *conv)
        assert float(exact.abs().max()) < 2**24
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=CL)
        assert torch.equal(_bits(got), _bits(exact.float().to(torch.bfloat16))), ((kh, kw), s, p, d, (h, w))
        bf16 = torch.ops.aten.convolution(qa.to(torch.bfloat16), qw.to(torch.bfloat16).contiguous(memory_format=CL),
                                          None, *conv)
        assert torch.equal(_bits(got), _bits(bf16))
        cases += 1
    assert cases == len(GEOMETRIES) == 68


def test_shifted_product_rejects_a_geometry_that_does_not_match():
    y = torch.zeros(2, 16, 5, 5).contiguous(memory_format=CL)
    u = torch.zeros(2, 8, 5, 5, dtype=torch.uint8).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="does not match"):  # 5x5 outputs of a 5x5 input need padding 1
        native.units.ext().shifted_product_bf16(y, u, 0.0, torch.zeros(16), 3, 3, [1, 1], [0, 0], [1, 1], native.codes.NONE_F,
                                           native.codes.NONE_F)


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_input_gradient_is_the_bf16_one_bit_for_bit(variant, monkeypatch):
    """_int8_input_grad against aten's bf16 convolution_backward (dx) and a float64 one over the stride-1
    geometries whose padding the flipped kernel reaches (p <= d (K - 1)); the gradient codes' bytes with
    zero points 0, in between and at the top."""
    cin, cout, lo, span, split, forward_route, dx_route = variant
    g = torch.Generator().manual_seed(cin * cout - lo)
    cases = 0
    for (kh, kw), s, p, d, (h, w) in GEOMETRIES:
        if s != 1 or p > d * (min(kh, kw) - 1):
            continue
        conv = ([1, 1], [p, p], [d, d], False, [0, 0], 1)
        ho, wo = h + 2 * p - d * (kh - 1), w + 2 * p - d * (kw - 1)
        zero = [0, 77, 255][cases % 3]
        q = torch.randint(0, 256, (4, cout, ho, wo), generator=g).contiguous(memory_format=CL)
        t = (q - zero).float()
        qw = _weight_codes(span, (cout, cin, kh, kw), g)
        assert _route(qw.flip(2, 3).transpose(0, 1), split) == dx_route
        got = native.int8_conv.int8_input_grad((q.to(torch.uint8), float(-zero)), qw.to(torch.bfloat16), conv, split)
        x_like = torch.zeros(4, cin, h, w, dtype=torch.float64).contiguous(memory_format=CL)
        exact = torch.ops.aten.convolution_backward(t.double(), x_like, qw.double(), None, *conv, [True, False, False])[0]
        assert got.shape == x_like.shape and got.is_contiguous(memory_format=CL) and float(exact.abs().max()) < 2**24
        assert torch.equal(_bits(got), _bits(exact.float().to(torch.bfloat16))), ((kh, kw), p, d, (h, w))
        bf16 = torch.ops.aten.convolution_backward(t.to(torch.bfloat16), x_like.to(torch.bfloat16),
                                                   qw.to(torch.bfloat16).contiguous(memory_format=CL), None, *conv,
                                                   [True, False, False])[0]
        assert torch.equal(_bits(got), _bits(bf16))
        # with the epilogue (the scaled dx plus its per-sample correction, in the shift's pass where the
        # weights are shifted): _scale_out's float32 values on that product, bit for bit
        scale, addend = torch.rand(1) + 0.5, torch.randn(1, cin, h, w).contiguous(memory_format=CL)
        dx = native.int8_conv.int8_input_grad((q.to(torch.uint8), float(-zero)), qw.to(torch.bfloat16), conv, split,
                                              (scale, addend))
        want = native.codes.scale_out(got, scale, None, addend=addend)
        assert dx.dtype == torch.float32 and dx.stride() == want.stride() and torch.equal(dx, want)
        cases += 1
    assert cases == 26


@pytest.mark.parametrize("bits", [2, 6, 8])
def test_gradient_codes_come_with_their_bytes_from_one_pass(bits):
    """_bf16_grad_codes(bytes=True): the same codes t (same dither), and q = t + k as bytes with -k."""
    torch.manual_seed(bits)
    grad = (torch.randn(6, 16, 5, 7) * 1e-3 + 2e-4).contiguous(memory_format=CL)  # an off-centre range
    mn, mx = torch.aminmax(grad)
    levels = torch.tensor(float(2**bits - 1))
    torch.manual_seed(1)
    _, t, s, c, none = native.codes.bf16_grad_codes(grad, mn, mx, levels, bits, values=False)
    torch.manual_seed(1)
    _, t2, s2, c2, (u, lo) = native.codes.bf16_grad_codes(grad, mn, mx, levels, bits, values=False, bytes=True)
    assert none is None and torch.equal(_bits(t), _bits(t2)) and torch.equal(s, s2) and torch.equal(c, c2)
    assert u.dtype == torch.uint8 and u.stride() == grad.stride() and lo <= 0
    assert torch.equal(u.float() + lo, t.float()) and int(u.max()) <= 2**bits - 1


@pytest.mark.parametrize("bits", [2, 5, 8])
@pytest.mark.parametrize("shape", [(4, 6, 7, 9), (128, 16, 8, 8)])
def test_input_bytes_without_codes_are_the_same_bytes(shape, bits):
    """_bf16_input_codes(codes=False): the bytes the call with codes writes, bit for bit, and no codes."""
    torch.manual_seed(bits)
    x = torch.randn(shape) * 3
    x.view(-1)[:4] = torch.tensor([-0.0, 0.0, float(2**bits), -float(2**bits)])  # zeros and ties
    x = x.contiguous(memory_format=CL)
    mn, mx = torch.aminmax(x)
    q, s, (u, lo, *_) = native.codes.bf16_input_codes(x, mn, mx, bits)
    none, s2, (u2, lo2, *_) = native.codes.bf16_input_codes(x, mn, mx, bits, codes=False)
    assert none is None and torch.equal(s, s2) and lo == lo2
    assert u2.dtype == torch.uint8 and u2.stride() == x.stride() and torch.equal(u2, u)


class Conv(nn.Module):
    def __init__(self, cin=16, cout=16):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _step(qmodel, x):
    """Output, input gradient, parameter gradients and BatchNorm buffers of one forward and backward."""
    xx = x.clone().requires_grad_()
    torch.manual_seed(5)
    out = qmodel(xx)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return [out.detach(), xx.grad] + [p.grad for p in qmodel.parameters()] + [
        b.clone() for n, b in qmodel.named_buffers() if "running" in n]


def _codes_reach_128(conv: nn.Conv2d) -> None:
    """Weights whose 8-bit codes, per output channel, span -127..128 with 128 once, on input channel 0
    (bottom -127.3 scales, top 127.7; the rest within 0.99 of the top); output channels after the first
    shrunk by 0.9, so that per tensor only the first reaches 128."""
    with torch.no_grad():
        for w in conv.weight:
            top = w.abs().max()
            w.clamp_(-0.99 * top, 0.99 * top)
            w[0, 0, 0], w[0, -1, -1] = top, -top * 127.3 / 127.7
        conv.weight[1:] *= 0.9


@pytest.mark.parametrize("weight_scale", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 4, 6, "8 shift", "8 split"])
@pytest.mark.parametrize("make", [Conv, Block], ids=["conv", "fused block"])
def test_int8_products_train_as_the_bf16_ones_bit_for_bit(make, bits, weight_scale, monkeypatch):
    """A plain convolution and a fused conv-BN-ReLU(+residual) block, channels_last: the forward and input
    gradient's int8 products on and off give the same output, gradients and running statistics bit for
    bit, and the same losses over SGD steps. At 8 bits, weights made positive, whose codes (0..255) are
    outside int8 on every input channel, take the shift; weights whose codes reach 128 on one input channel
    split it. (The weight gradient's int8 product is exact, which bf16's is not: the next tests.)"""
    opts = OPTS.replace(int8_weight_grad=False)  # (its int8 product is exact, bf16's is not: the next tests)
    route = {"8 shift": "shift", "8 split": "split"}.get(bits, "fits")
    bits = int(str(bits)[0])
    torch.manual_seed(bits)
    model = make().to(memory_format=CL)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and route == "shift":
            with torch.no_grad():
                m.weight.abs_().add_(1e-3)
        elif isinstance(m, nn.Conv2d) and route == "split":
            _codes_reach_128(m)
    x = torch.randn(8, 16, 12, 12).contiguous(memory_format=CL)
    plan = fracpass.Plan.static(bits, bits, 8, rules=[fracpass.Rule(weight_scale=weight_scale)])
    qmodel = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=opts)
    calls, routes = [], []
    real = native.int8_conv.int8_product

    def spy(kept, qw, conv, split, epilogue=None, hand=None):
        calls.append(1)
        routes.append(_route(qw, split))
        return real(kept, qw, conv, split, epilogue, hand)

    monkeypatch.setattr(native.int8_conv, "int8_product", spy)
    runs, products = {}, {}
    for on in (True, False):
        ran = _int8(qmodel, opts, on)
        runs[on] = _step(ran, x)
        products[on] = {p[:2] for name, p in native.product_paths(ran).items() if "conv" in name}
    # the forward of each convolution, and with a per-tensor weight scale its input gradient
    convs = (1 if make is Conv else 2) * (2 if weight_scale == "tensor" else 1)
    assert len(calls) == convs and set(routes) == {route}
    # per-channel weights: dx on bf16 over the folded weight (bf16_conv.folded_weight), with int8 units or not
    dx = {True: "int8", False: "bf16"} if weight_scale == "tensor" else {True: "bf16", False: "bf16"}
    assert products == {True: {("int8", dx[True])}, False: {("bf16", dx[False])}}
    for i, (a, b) in enumerate(zip(runs[True], runs[False])):
        assert a.dtype == b.dtype and torch.equal(a, b), f"tensor {i} differs"
    losses = {}
    for on in (True, False):
        trained = _int8(qmodel, opts, on)
        opt = torch.optim.SGD(trained.parameters(), lr=0.05)
        losses[on] = []
        for k in range(3):
            torch.manual_seed(k)
            loss = nn.functional.cross_entropy(trained(x).flatten(1)[:, :3], torch.arange(8) % 3)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[on].append(float(loss.detach()))
    assert losses[True] == losses[False]


def test_saved_input_codes_stay_bytes_on_the_int8_forward():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=CL).requires_grad_()
    nat = fracpass.transform(Conv().to(memory_format=CL), fracpass.Plan.static(8, 8, 8), example_inputs=(x.detach(),),
                             execution="native", native=OPTS)
    big = _saved_dtypes(nat, x)
    assert big and all(d == torch.uint8 for d in big), big
    assert native.product_paths(nat)["conv"][0] == "int8"


@pytest.mark.parametrize("what", ["NCHW", "grouped", "transposed", "switched off", "no int8 units"])
def test_convolutions_the_int8_forward_does_not_take_keep_the_bf16_product_and_say_why(what, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8)
    conv = Conv()
    if what == "grouped":
        conv.conv = nn.Conv2d(16, 16, 3, padding=1, groups=2)
    elif what == "transposed":
        conv.conv = nn.ConvTranspose2d(16, 16, 3, padding=1)
    if what != "NCHW":
        conv, x = conv.to(memory_format=CL), x.contiguous(memory_format=CL)
    opts = OPTS.replace(int8_forward=what != "switched off")
    if what == "no int8 units":
        monkeypatch.setattr(native.units, "int8_support", lambda device=None: "this CPU has no int8 dot-product units")
    nat = fracpass.transform(conv, fracpass.Plan.static(8, 8, 8), example_inputs=(x,), execution="native", native=opts)
    transposed = what == "transposed"
    geometry = ([1, 1], [1, 1], [1, 1], transposed, [0, 0], 2 if what == "grouped" else 1)
    why = native.int8_conv.int8_reasons(x, conv.conv.weight, geometry, torch.ones(1), 8, opts)[0]
    expect = {"NCHW": "an NCHW input", "grouped": "not a 2-D ungrouped convolution",
              "transposed": "not a 2-D ungrouped convolution", "switched off": "int8_forward is False",
              "no int8 units": "no int8 dot-product units"}[what]
    assert why is not None and expect in why
    calls = []
    monkeypatch.setattr(native.int8_conv, "int8_product", lambda *a: calls.append(1))
    nat(x).sum().backward()
    assert not calls
    (name,) = native.product_paths(nat)
    note = native.op_paths(nat)[name][1]
    assert native.product_paths(nat)[name][0] == "bf16" and "the forward product" not in note


@pytest.mark.parametrize("what", ["strided", "padding beyond the kernel", "per-channel weights", "switched off"])
def test_input_gradients_the_int8_product_does_not_take_keep_the_bf16_one_and_say_why(what, monkeypatch):
    """The forward still runs on int8; the input gradient's product stays on bfloat16 (or float32, for a
    per-channel weight scale) with the same values as with NativeOptions.int8_input_grad off."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=CL)
    conv = Conv()
    if what == "strided":
        conv.conv = nn.Conv2d(16, 16, 3, padding=1, stride=2)
    elif what == "padding beyond the kernel":
        conv.conv = nn.Conv2d(16, 16, 1, padding=1)
    rules = [fracpass.Rule(weight_scale="channel" if what == "per-channel weights" else "tensor")]
    nat = fracpass.transform(conv.to(memory_format=CL), fracpass.Plan.static(8, 8, 8, rules=rules),
                             example_inputs=(x,), execution="native", native=OPTS)
    opts = OPTS.replace(int8_input_grad=what != "switched off")
    fracpass.native.configure(nat, opts)
    c = nat.conv if hasattr(nat, "conv") else conv.conv
    sw = torch.ones(16 if what == "per-channel weights" else 1)
    why = native.int8_conv.int8_reasons(x, c.weight, (list(c.stride), list(c.padding), list(c.dilation), False, [0, 0], 1),
                               sw, 8, opts)[1]
    expect = {"strided": "a strided convolution", "padding beyond the kernel": "padding beyond the kernel's reach",
              "per-channel weights": "per output channel", "switched off": "int8_input_grad is False"}[what]
    assert why is not None and expect in why
    grads = {}
    for on in (True, False):
        fracpass.native.configure(nat, opts.replace(int8_input_grad=on and what != "switched off"))
        xx = x.clone().requires_grad_()
        torch.manual_seed(3)
        nat(xx).square().sum().backward()
        grads[on] = xx.grad
        assert native.product_paths(nat)["conv"][:2] == ("int8", "bf16")  # per-channel weights: folded, on bf16
        assert "the input gradient's" not in native.op_paths(nat)["conv"][1]
    assert torch.equal(grads[True], grads[False])


WG_VARIANTS = [(8, 16), (24, 32), (16, 16), (32, 16)]  # input channels 8 and 24 take the scalar repacking


@pytest.mark.parametrize("cin, cout", WG_VARIANTS)
def test_weight_gradient_kernel_is_exact(cin, cout):
    """weight_grad_u8: the window products of the gradient's and input's codes and the windows' sums of
    the input codes equal a float64 convolution_backward's over kernel sizes, paddings, dilations, widths
    whose rows do and do not fill the 16-pixel repacking blocks, code offsets and zero points."""
    ext = native.units.ext()
    if not ext.vnni_weight_grad():
        pytest.skip("the CPU kernels were built without AVX512-VNNI")
    g = torch.Generator().manual_seed(cin + cout)
    cases = 0
    for (kh, kw), p, d, (h, w), lo, kg in itertools.product([(1, 1), (3, 3), (5, 3), (3, 1)], [0, 1, 2], [1, 2],
                                                           [(7, 9), (8, 8), (12, 12), (5, 20)], [0, -37], [0, 100]):
        ho, wo = h + 2 * p - d * (kh - 1), w + 2 * p - d * (kw - 1)
        if ho < 1 or wo < 4 or wo % 4:
            continue
        ua = torch.randint(0, 256, (3, cin, h, w), generator=g, dtype=torch.uint8).contiguous(memory_format=CL)
        ug = torch.randint(0, 256, (3, cout, ho, wo), generator=g, dtype=torch.uint8).contiguous(memory_format=CL)
        prod, sums = ext.weight_grad_u8(ug, float(kg), ua, float(lo), kh, kw, [p, p], [d, d])
        qa, t = ua.double() + lo, ug.double() - kg
        geometry = ([1, 1], [p, p], [d, d], False, [0, 0], 1)
        want = torch.ops.aten.convolution_backward(t, qa, torch.zeros(cout, cin, kh, kw, dtype=torch.float64), None,
                                                   *geometry, [False, True, False])[1]
        ones = torch.ones(1, 1, ho, wo, dtype=torch.float64)
        want_sums = torch.ops.aten.convolution_backward(ones, qa.sum(0, keepdim=True),
                                                        torch.zeros(1, cin, kh, kw, dtype=torch.float64), None,
                                                        *geometry, [False, True, False])[1]
        assert torch.equal(prod, want) and torch.equal(sums, want_sums), ((kh, kw), p, d, (h, w), lo, kg)
        cases += 1
    assert cases == 160


def _conv_grads(qmodel, x):
    xx = x.clone().requires_grad_()
    torch.manual_seed(5)
    out = qmodel(xx)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return {n: p.grad for n, p in qmodel.named_parameters() if n.endswith("weight") and p.dim() == 4}


@pytest.mark.parametrize("weight_scale", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_int8_weight_gradient_is_the_simulations_to_float32_rounding(bits, weight_scale, monkeypatch):
    """A channels-last convolution's weight gradient on the VNNI kernel: within float32 rounding of the
    simulation (1e-5 of its largest magnitude), where the bf16 product is off by its output rounding."""
    torch.manual_seed(bits)
    model = Conv().to(memory_format=CL)
    x = torch.randn(8, 16, 12, 12).contiguous(memory_format=CL)
    plan = fracpass.Plan.static(bits, bits, bits, rules=[fracpass.Rule(weight_scale=weight_scale)])
    sim = fracpass.transform(model, plan, example_inputs=(x,))
    nat = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=OPTS)
    want = _conv_grads(sim, x)["conv.weight"]
    ran = copy.deepcopy(nat)
    got = _conv_grads(ran, x)["conv.weight"]
    assert native.product_paths(ran)["conv"][2] == "int8" and "the weight gradient's" in native.op_paths(ran)["conv"][1]
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale and got.stride() == model.conv.weight.stride()
    ran = fracpass.native.configure(copy.deepcopy(nat), OPTS.replace(int8_weight_grad=False))
    bf16 = _conv_grads(ran, x)["conv.weight"]
    assert native.product_paths(ran)["conv"][2] == "bf16"
    assert float((bf16 - want).abs().max()) <= 2.0**-8 * 4 * scale  # the bf16 route: its output rounding


@pytest.mark.parametrize("weight_scale", ["tensor", "channel"])
def test_a_fused_block_trains_with_the_int8_weight_gradient_as_with_bf16s(weight_scale, monkeypatch):
    """The fused conv-BN blocks' weight gradients on the VNNI kernel and on bf16: the same within bf16's
    output rounding, and SGD's losses stay together."""
    torch.manual_seed(0)
    model = Block().to(memory_format=CL)
    x = torch.randn(8, 16, 12, 12).contiguous(memory_format=CL)
    plan = fracpass.Plan.static(8, 8, 8, rules=[fracpass.Rule(weight_scale=weight_scale)])
    nat = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=OPTS)
    ran = copy.deepcopy(nat)
    got = _conv_grads(ran, x)
    assert all(p[2] == "int8" for n, p in native.product_paths(ran).items() if "conv" in n)
    want = _conv_grads(fracpass.native.configure(copy.deepcopy(nat), OPTS.replace(int8_weight_grad=False)), x)
    assert got.keys() == want.keys() and len(got) == 2
    for name in got:
        assert float((got[name] - want[name]).abs().max()) <= 2.0**-8 * 4 * float(want[name].abs().max()), name
    losses = {}
    for on in (True, False):
        trained = fracpass.native.configure(copy.deepcopy(nat), OPTS.replace(int8_weight_grad=on))
        opt = torch.optim.SGD(trained.parameters(), lr=0.05)
        losses[on] = []
        for k in range(3):
            torch.manual_seed(k)
            loss = nn.functional.cross_entropy(trained(x), torch.arange(8) % 3)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[on].append(float(loss.detach()))
    assert max(abs(a - b) for a, b in zip(losses[True], losses[False])) <= 1e-3 * max(losses[False])


@pytest.mark.parametrize("what", ["strided", "8 output channels", "a 5-wide kernel", "output 6 wide", "switched off"])
def test_weight_gradients_the_vnni_kernel_does_not_take_keep_bf16_and_say_why(what, monkeypatch):
    torch.manual_seed(0)
    cin, cout, k, stride, width = 16, 16, 3, 1, 8
    if what == "strided":
        stride = 2
    elif what == "8 output channels":
        cout = 8
    elif what == "a 5-wide kernel":
        k = 5
    elif what == "output 6 wide":
        width = 6
    x = torch.randn(4, cin, 8, width).contiguous(memory_format=CL)
    model = Conv()
    model.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    nat = fracpass.transform(model.to(memory_format=CL), fracpass.Plan.static(8, 8, 8), example_inputs=(x,),
                             execution="native", native=OPTS)
    opts = OPTS.replace(int8_weight_grad=what != "switched off")
    fracpass.native.configure(nat, opts)
    c = model.conv
    why = native.int8_conv.int8_reasons(x, c.weight, (list(c.stride), list(c.padding), list(c.dilation), False, [0, 0], 1),
                               torch.ones(1), 8, opts)[2]
    expect = {"strided": "a strided convolution", "8 output channels": "8 output channels",
              "a 5-wide kernel": "a kernel 5 wide", "output 6 wide": "an output 6 wide",
              "switched off": "int8_weight_grad is False"}[what]
    assert why is not None and expect in why, why
    calls = []
    monkeypatch.setattr(native.int8_conv, "int8_weight_grad", lambda *a: calls.append(1))
    nat(x).square().sum().backward()
    assert not calls and native.product_paths(nat)["conv"][2] == "bf16"
    assert "the weight gradient's" not in native.op_paths(nat)["conv"][1]


def test_weight_gradient_kernel_is_exact_across_its_flushes():
    """2,240 output rows of 8 four-pixel groups: the kernel's int32 sums flush into int64 after 2,000 rows
    and its next block starts mid-sample (sample 62, row 16): random codes, equal to float64's product."""
    ext = native.units.ext()
    if not ext.vnni_weight_grad():
        pytest.skip("the CPU kernels were built without AVX512-VNNI")
    g = torch.Generator().manual_seed(5)
    ua = torch.randint(0, 256, (70, 8, 32, 32), generator=g, dtype=torch.uint8).contiguous(memory_format=CL)
    ug = torch.randint(0, 256, (70, 16, 32, 32), generator=g, dtype=torch.uint8).contiguous(memory_format=CL)
    prod, _ = ext.weight_grad_u8(ug, 9.0, ua, -3.0, 3, 3, [1, 1], [1, 1])
    geometry = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    want = torch.ops.aten.convolution_backward(ug.double() - 9, ua.double() - 3, torch.zeros(16, 8, 3, 3, dtype=torch.float64),
                                               None, *geometry, [False, True, False])[1]
    assert torch.equal(prod, want)


def test_weight_gradient_kernel_sums_past_int32():
    """71,680 pixels of |t q_a| = 128 x 255: each int32 lane would pass 2^31; the kernel flushes into int64."""
    ext = native.units.ext()
    if not ext.vnni_weight_grad():
        pytest.skip("the CPU kernels were built without AVX512-VNNI")
    ua = torch.full((70, 8, 32, 32), 255, dtype=torch.uint8).contiguous(memory_format=CL)
    ug = torch.zeros(70, 16, 32, 32, dtype=torch.uint8).contiguous(memory_format=CL)
    prod, sums = ext.weight_grad_u8(ug, 128.0, ua, 0.0, 1, 1, [0, 0], [1, 1])
    pixels = 70 * 32 * 32
    assert -128 * 255 * pixels < -2**31
    assert torch.equal(prod, torch.full((16, 8, 1, 1), -128.0 * 255 * pixels, dtype=torch.float64))
    assert torch.equal(sums, torch.full((1, 8, 1, 1), 255.0 * pixels, dtype=torch.float64))
