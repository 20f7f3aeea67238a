"""Native convolutions on bfloat16 codes (fracpass.native's bf16 path): every conv kind must compute
what the simulation computes, within the rounding bfloat16 outputs imply.

The codes themselves are exact in bfloat16 (integers of magnitude <= 255) and oneDNN accumulates in
float32, so the one loss is each product's output rounded to bfloat16 (unit roundoff 2^-8) before
the float32 scales. In backward the gradient's codes carry an offset c (|c| <= half a gradient step
s_g); its term B = c * (window sums) is computed in float32 and the product A = want - B is rounded.
So an element is off by at most 2^-8 |A| <= 2^-8 (|want| + |B|): the tests allow
2^-8 (max |want| + 2 max |B|), with max |B| bounded from the inputs (s_g / 2 times the largest sum of
|x| over an input channel for dw, of |w| for dx), plus the bias's share in the forward and 1e-5 of
the range for float32 summation order. Fallbacks must give the simulated result bit for bit.
"""
from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native
from test_native import _pair, _run, _saved_dtypes, kernels  # noqa: F401  (kernels: the fused / torch-op fixture)

BF16_U = 2.0**-8  # bfloat16's unit roundoff


@pytest.fixture(autouse=True)
def bf16_cpu(monkeypatch):
    if native.bf16_support() is not None:
        pytest.skip("this CPU has no bfloat16 dot-product instructions: convolutions run simulated")
    # these tests use small convolutions, which the bf16 path normally leaves to the simulation as not
    # worth it (NativeOptions.min_conv_macs); they check its arithmetic, so _pair (test_native) runs them
    # at every size


class Conv(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


CASES = {
    # name: (conv module, input shape); inputs are offset so that 8-bit codes are asymmetric
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (3, 4, 10)),
    "conv2d 3x3 pad 1": (lambda: nn.Conv2d(6, 8, 3, padding=1), (3, 6, 9, 9)),
    "conv2d stride 2 no pad": (lambda: nn.Conv2d(6, 8, 3, stride=2), (2, 6, 9, 9)),
    "conv2d grouped dilated": (lambda: nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3), (2, 6, 8, 8)),
    "conv2d depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 7, 7)),
    "conv2d channels_last": (lambda: nn.Conv2d(6, 8, 3, padding=1).to(memory_format=torch.channels_last),
                             (2, 6, 8, 8)),
    "conv3d stride 2": (lambda: nn.Conv3d(3, 4, 3, padding=1, stride=2), (2, 3, 6, 6, 6)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 3, 4, stride=2), (2, 4, 7)),
    "conv_transpose2d grouped": (lambda: nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
                                 (2, 8, 5, 5)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1), (2, 4, 3, 3, 3)),
}


def _inputs(name, shape):
    x = torch.rand(*shape) * 3 - 0.5
    if "channels_last" in name:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x,)


def _offset_bounds(model, inputs, bits):
    """Upper bounds of the gradient offset's term |B| in (dx, dw): s_g / 2 times the largest sum of
    |w| (dx) or |x| (dw) over one input channel, |x| and |w| padded by a quantization step."""
    conv, (x,) = model.conv, inputs
    with torch.no_grad():
        y = conv(x)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))  # dL/dy in _run
    levels = 2.0**bits - 1
    s_g = float(r.max() / levels - r.min() / levels)
    xa = x.abs() + float(x.abs().max()) / levels
    wa = conv.weight.detach().abs() + float(conv.weight.detach().abs().max()) / levels
    w_in = 0 if isinstance(conv, nn.modules.conv._ConvTransposeNd) else 1  # the weight's input-channel axis
    dx = s_g / 2 * float(wa.movedim(w_in, 0).flatten(1).sum(1).max())
    dw = s_g / 2 * float(xa.movedim(1, 0).flatten(1).sum(1).max())
    return dx, dw


def _assert_within_bf16(got, want, what, model=None, inputs=None, bits=8, folded=False):
    """got[0] the output, got[1] dx, got[2] dw, then the bias gradient (float32 sums: 1e-5). ``folded``: dx's
    product took a per-channel weight scale folded into bfloat16 weight values (bf16_conv.folded_weight),
    which adds u (1 + u) s_g conv^T(|t|, |w|) <= u (1 + u) 2^(b-1) s_g max sum |w| = u (1 + u) 2^b offsets[0]."""
    offsets = _offset_bounds(model, inputs, bits) if model is not None else (0.0, 0.0)
    fold = BF16_U * (1 + BF16_U) * 2.0**bits * offsets[0] if folded else 0.0
    bias = model.conv.bias if model is not None else None
    for i, (g, w) in enumerate(zip(got, want)):
        spread = 1e-5 * (float(w.max() - w.min()) + float(w.abs().max()) or 1.0)  # float32 summation order
        if i == 0:
            bound = BF16_U * (float(w.abs().max()) + (float(bias.detach().abs().max()) if bias is not None else 0.0))
        elif i in (1, 2):
            bound = BF16_U * (float(w.abs().max()) + 2 * offsets[i - 1]) + (fold if i == 1 else 0.0)
        else:
            bound = 0.0
        err = float((g - w).abs().max())
        assert err <= bound + spread, (f"{what}: tensor {i} differs by {err:.3g} (bound {bound + spread:.3g}; "
                                       f"{err / float(w.abs().max()):.2g} of its largest magnitude)")


def _count_bf16(monkeypatch):
    calls = []
    real = native.bf16_conv.apply
    monkeypatch.setattr(native.bf16_conv, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("weight_scale", ["channel", "tensor"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_convolution_matches_simulation(case, bits, weight_scale, kernels, monkeypatch):
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model, inputs = Conv(factory()), _inputs(case, shape)
    plan = fracpass.Plan.static(w=bits, a=bits, g=bits, rules=[fracpass.Rule(weight_scale=weight_scale)])
    sim, nat = _pair(model, plan, inputs)
    calls = _count_bf16(monkeypatch)
    want = _run(sim, inputs)
    assert not calls
    got = _run(nat, inputs)
    assert calls == [1], f"{case}: the bf16 convolution did not run"
    _assert_within_bf16(got, want, f"{case} at {bits} bits, {weight_scale} weights", model, inputs, bits,
                        folded=weight_scale == "channel")
    assert got[0].is_contiguous(memory_format=torch.channels_last) == want[0].is_contiguous(
        memory_format=torch.channels_last)
    path, note = native.op_paths(nat)["conv"]
    assert path == "bf16"
    # per-channel weights: their scale lies on g x w's contracted axis, so that product runs on bf16 over
    # the folded weight values (not on int8); a channels-last 2-D convolution's forward runs on oneDNN's
    # int8 convolution where the CPU kernels run (and, with a per-tensor weight scale, its input
    # gradient's: a stride-1 one's is a convolution too)
    fwd = "int8" if case == "conv2d channels_last" and kernels == "fused" else "bf16"
    expect = (fwd, "bf16", "bf16") if weight_scale == "channel" else (fwd, fwd, "bf16")
    assert native.product_paths(nat)["conv"] == expect
    assert ("on int8 at the last call" in note) == (fwd == "int8")
    assert "g x w in fp32" not in note


def test_gradient_above_8_bits_runs_conv_backward_in_fp32_exactly(monkeypatch):
    torch.manual_seed(0)
    model, inputs = Conv(nn.Conv2d(6, 8, 3, padding=1)), _inputs("", (3, 6, 9, 9))
    sim, nat = _pair(model, fracpass.Plan.static(8, 8, 12), inputs)
    want, got = _run(sim, inputs), _run(nat, inputs)
    _assert_within_bf16(got[:1], want[:1], "forward at 8 bits", model, inputs)
    for g, w in zip(got[1:], want[1:]):  # decoded codes, float32 products: float32 rounding only
        assert float((g - w).abs().max()) <= 1e-5 * float(w.max() - w.min())
    assert "gradient at 12 bits" in native.op_paths(nat)["conv"][1]
    assert native.product_paths(nat)["conv"] == ("bf16", "fp32", "fp32")


@pytest.mark.parametrize("bits", [9, 12, 16])
def test_conv_bits_above_8_fall_back_to_the_simulation_exactly(bits, monkeypatch):
    torch.manual_seed(0)
    model, inputs = Conv(nn.Conv2d(6, 8, 3, padding=1)), _inputs("", (2, 6, 8, 8))
    sim, nat = _pair(model, fracpass.Plan.static(bits, bits, 8), inputs)
    calls = _count_bf16(monkeypatch)
    for g, w in zip(_run(nat, inputs), _run(sim, inputs)):
        assert torch.equal(g, w)
    assert not calls
    path, why = native.op_paths(nat)["conv"]
    assert path == "simulated" and f"{bits} bits: bfloat16 holds codes of at most 8" in why


def test_cpu_without_bf16_instructions_runs_convs_simulated_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    monkeypatch.setattr(native.units, "_warned", set())
    torch.manual_seed(0)
    model, inputs = Conv(nn.Conv2d(6, 8, 3, padding=1)), _inputs("", (2, 6, 8, 8))
    sim, nat = _pair(model, fracpass.Plan.static(8, 8, 8), inputs)
    calls = _count_bf16(monkeypatch)
    with caplog.at_level("WARNING", logger="fracpass.native"):
        for g, w in zip(_run(nat, inputs), _run(sim, inputs)):
            assert torch.equal(g, w)
        _run(nat, inputs)
    assert not calls
    assert sum("no bfloat16 dot-product instructions" in r.getMessage() for r in caplog.records) == 1
    path, why = native.op_paths(nat)["conv"]
    assert path == "simulated" and "avx512_bf16" in why
    assert "path conv: simulated" in str(fracpass.coverage(nat))


@pytest.mark.parametrize("what", ["padding='same'", "unbatched input"])
def test_convs_native_cannot_take_fall_back_with_the_reason(what, monkeypatch):
    torch.manual_seed(0)
    if what == "padding='same'":
        model, inputs = Conv(nn.Conv2d(6, 8, 3, padding="same")), (torch.randn(2, 6, 8, 8),)
    else:
        model, inputs = Conv(nn.Conv2d(6, 8, 3, padding=1)), (torch.randn(6, 8, 8),)
    sim, nat = _pair(model, fracpass.Plan.static(8, 8, 8), inputs)
    calls = _count_bf16(monkeypatch)
    for g, w in zip(_run(nat, inputs), _run(sim, inputs)):
        assert torch.equal(g, w)
    assert not calls
    path, why = native.op_paths(nat)["conv"]
    assert path == "simulated" and why.startswith("at the last call: ")
    assert ("padding='same'" in why) if what == "padding='same'" else ("unbatched 3-D input" in why)


def test_saved_conv_operands_are_low_precision_codes(kernels):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8, 8, requires_grad=True)
    _, nat = _pair(Conv(nn.Conv2d(6, 8, 3, padding=1)), fracpass.Plan.static(8, 8, 8), (x.detach(),))
    big = _saved_dtypes(nat, x)
    # the input's codes: one byte each from the kernels (codes_to_u8), bfloat16 from the torch ops
    want = torch.uint8 if kernels == "fused" else torch.bfloat16
    assert big and all(d == want for d in big), big


@pytest.mark.parametrize("shape", [(8, 4, 8, 8), (11, 3, 5, 7)])  # the second: rows and columns off the kernel's blocks
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_saved_input_codes_narrow_to_bytes_and_back_exactly(layout, shape):
    if native.units.ext() is None:
        pytest.skip("the fused native kernels could not be built here")
    n = torch.Size(shape).numel()
    codes = torch.arange(-255, 1, dtype=torch.float32).repeat(n // 256 + 1)[:n].view(shape)  # 256 values: the widest
    codes = codes[torch.randperm(shape[0], generator=torch.Generator().manual_seed(0))]  # rows apart
    if layout == "channels_last":
        codes = codes.contiguous(memory_format=torch.channels_last)
    q = codes.to(torch.bfloat16)
    u, offset = native.conv_state.saved_codes(q, None)
    assert (u.dtype, u.stride(), float(offset)) == (torch.uint8, q.stride(), -255.0)
    state = native.conv_state.ConvState(conv=(), gbits=8, code_offset=float(offset))  # as the ops hold it
    back, none = native.bf16_conv._widened_codes(state, u)
    assert back.dtype == torch.bfloat16 and back.stride() == q.stride() and torch.equal(back, q) and none is None
    back, total = native.bf16_conv._widened_codes(state, u, batch_sum=True)  # with the batch sum, from the same pass
    want = native.conv_offsets._batch_sum(q)
    assert torch.equal(back, q) and torch.equal(total, want) and total.stride() == want.stride()
    wider = torch.cat([q, torch.ones_like(q[:1])])  # -255..1, 257 values: kept as bfloat16
    kept, offset = native.conv_state.saved_codes(wider, None)
    assert kept is wider and offset is None
    state = state._replace(code_offset=None)
    assert native.bf16_conv._widened_codes(state, wider, batch_sum=True) == (wider, None)


@pytest.mark.parametrize("bits", [2, 5, 8])
@pytest.mark.parametrize("shape, layout", [((4, 6, 7, 9), "NCHW"), ((4, 6, 7, 9), "channels_last"),
                                           ((128, 16, 8, 8), "channels_last"), ((3, 37), "rows")])
def test_input_codes_come_with_their_bytes_from_one_pass(shape, layout, bits):
    """_bf16_input_codes: the codes _bf16_codes gives, bit for bit (signed zeros too), and the same codes
    as bytes q - lo (what the convolution keeps for backward), from the same kernel call."""
    if native.units.ext() is None:
        pytest.skip("the fused native kernels could not be built here")
    torch.manual_seed(bits)
    x = torch.randn(shape) * 3
    x.view(-1)[:6] = torch.tensor([-0.0, 0.0, 1e-9, -1e-9, float(2**bits), -float(2**bits)])  # ties and zeros
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mn, mx = torch.aminmax(x)
    q, s, (u, lo, *_) = native.codes.bf16_input_codes(x, mn, mx, bits)
    want_q, want_s = native.codes.bf16_codes(x, mn, mx, float(2**bits - 1))
    assert torch.equal(q.view(torch.int16), want_q.view(torch.int16)) and torch.equal(s, want_s)
    assert u.dtype == torch.uint8 and u.stride() == x.stride()
    assert torch.equal(u.float() + lo, want_q.float())


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape, layout", [((3, 5, 7, 9), "NCHW"), ((3, 5, 7, 9), "channels_last"),
                                           ((4, 16, 130, 130), "channels_last"), ((2, 33), "rows")])
def test_output_scaling_adds_the_per_sample_correction_as_the_torch_ops_do(shape, layout, per_channel, monkeypatch):
    """_scale_out's addend (dx's offset correction, one sample's worth added to every sample): the kernel
    (scale_bf16) gives torch's v * s + a bit for bit (rounded twice, no FMA), across rows and spans; an
    addend in another layout than the samples' takes the torch ops."""
    if native.units.ext() is None:
        pytest.skip("the fused native kernels could not be built here")
    torch.manual_seed(0)
    cl = (lambda t: t.contiguous(memory_format=torch.channels_last)) if layout == "channels_last" else (lambda t: t)
    v = cl(torch.randint(-255, 256, shape).to(torch.bfloat16))
    scale = torch.rand(shape[1] if per_channel else 1) + 0.1
    addend = cl(torch.randn((1,) + shape[1:]))
    calls = []
    real = native.units.ext()
    counted = staticmethod(lambda *a: calls.append(1) or real.scale_bf16(*a))
    monkeypatch.setattr(native.units, "ext", lambda t=None: type("Ext", (), {"scale_bf16": counted})())
    got = native.codes.scale_out(v, scale, None, addend=addend)
    assert calls == [1] and got.stride() == v.stride()
    monkeypatch.setattr(native.units, "ext", lambda t=None: None)
    want = native.codes.scale_out(v, scale, None, addend=addend)
    assert torch.equal(got, want) and want.stride() == v.stride()
    if layout == "channels_last":  # an NCHW addend beside channels-last samples: the torch ops add it
        assert not native.codes.same_sample_layout(addend.contiguous(), v)


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_offset_corrections_window_sums_match_a_float64_convolution_of_ones(layout):
    """dx's correction conv^T(1, q_w) and dw's conv_w(1, sum_n q_a) from the kernels' taps (2-D, groups 1):
    exactly a float64 convolution of ones (dx's: integer sums; dw's: rounded once to float32), over
    kernel sizes, strides, paddings, dilations and odd sizes, in q_a's layout."""
    if native.units.ext() is None:
        pytest.skip("the fused native kernels could not be built here")
    torch.manual_seed(0)
    cases = 0
    for (kh, kw), s, p, d, (h, w) in itertools.product([(1, 1), (3, 3), (5, 3)], [1, 2], [0, 1, 2], [1, 2],
                                                       [(7, 9), (8, 8)]):
        ho, wo = (h + 2 * p - d * (kh - 1) - 1) // s + 1, (w + 2 * p - d * (kw - 1) - 1) // s + 1
        if ho < 1 or wo < 1:
            continue
        qa = torch.randint(-255, 256, (4, 3, h, w)).to(torch.bfloat16)
        qw = torch.randint(-255, 256, (5, 3, kh, kw)).to(torch.bfloat16)
        if layout == "channels_last":
            qa, qw = (z.contiguous(memory_format=torch.channels_last) for z in (qa, qw))
        args = ([s, s], [p, p], [d, d], False, [0, 0], 1)
        t = torch.zeros(4, 5, ho, wo, dtype=torch.bfloat16)
        assert native.conv_offsets._window_kernels(t, qa, qw, args) is not None
        got = native.conv_offsets.ones_input_grad(t, qa, qw, args)
        want = torch.ops.aten.convolution_backward(torch.ones(1, 5, ho, wo, dtype=torch.float64), qa[:1].double(),
                                                   qw.double(), None, *args, [True, False, False])[0]
        assert torch.equal(got, want.float()) and got.stride(1) == (1 if layout == "channels_last" else h * w)
        total = native.conv_offsets._batch_sum(qa)
        sums = native.conv_offsets.ones_weight_grad(t, qa, qw, args, torch.tensor(0.5), total)
        want = torch.ops.aten.convolution_backward(torch.ones(1, 1, ho, wo, dtype=torch.float64), total.double(),
                                                   torch.zeros(1, 3, kh, kw, dtype=torch.float64), None, *args,
                                                   [False, True, False])[1]
        assert sums.shape == qw.shape and torch.equal(sums, (want.float() * 0.5).expand(qw.shape))
        cases += 1
    assert cases == 68
    # what the kernels do not take runs the convolution of ones: grouped, transposed, 1-D
    grouped = (torch.zeros(2, 4, 6, 6, dtype=torch.bfloat16), torch.zeros(4, 2, 3, 3, dtype=torch.bfloat16))
    assert native.conv_offsets._window_kernels(grouped[0], *grouped, ([1, 1], [1, 1], [1, 1], False, [0, 0], 2)) is None
    assert native.conv_offsets._window_kernels(grouped[0], *grouped, ([1, 1], [1, 1], [1, 1], True, [0, 0], 1)) is None
    line = (torch.zeros(2, 4, 6, dtype=torch.bfloat16), torch.zeros(4, 4, 3, dtype=torch.bfloat16))
    assert native.conv_offsets._window_kernels(line[0], *line, ([1], [1], [1], False, [0], 1)) is None


def test_narrowed_input_codes_give_the_same_gradients(monkeypatch):
    if native.units.ext() is None:
        pytest.skip("the fused native kernels could not be built here")
    torch.manual_seed(0)
    model, inputs = Conv(nn.Conv2d(6, 8, 3, padding=1)), _inputs("", (4, 6, 8, 8))
    _, nat = _pair(model, fracpass.Plan.static(6, 6, 8), inputs)
    got = _run(nat, inputs)
    monkeypatch.setattr(native.conv_state, "saved_codes", lambda q, kept, narrow=True: (q, None))
    want = _run(nat, inputs)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_stage_switch_moves_a_conv_between_bf16_and_simulation():
    torch.manual_seed(0)
    model, inputs = Conv(nn.Conv2d(6, 8, 3, padding=1)), _inputs("", (2, 6, 8, 8))
    sim, nat = _pair(model, fracpass.Plan.progressive(fw=(4, 12, 8), bw=(6, 16, 8)), inputs)
    graph = nat.graph
    for stage, expected in ((0, "bf16"), (1, "simulated"), (2, "bf16")):
        fracpass.set_stage(sim, stage)
        fracpass.set_stage(nat, stage)
        want, got = _run(sim, inputs), _run(nat, inputs)
        _assert_within_bf16(got, want, f"stage {stage}", model, inputs, bits=(4, 8, 8)[stage], folded=True)
        assert native.op_paths(nat)["conv"][0] == expected
        assert nat.graph is graph


def test_a_bf16_conv_model_copies_pickles_and_exports_as_a_simulated_one(tmp_path):
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model, inputs = Conv(nn.Conv2d(6, 8, 3, padding=1)), _inputs("", (2, 6, 8, 8))
    sim, nat = _pair(model, fracpass.Plan.static(8, 8, 8), inputs)
    assert "bf16_conv2d" in nat.code
    _run(sim, inputs), _run(nat, inputs)  # a training batch: EMA ranges
    nat.load_state_dict(sim.state_dict())
    want = _run(nat, inputs)
    for clone in (copy.deepcopy(nat), pickle.loads(pickle.dumps(nat))):
        assert "bf16_conv2d" in clone.code
        for g, w in zip(_run(clone, inputs), want):
            assert torch.equal(g, w)
    a = fracpass.export_onnx(sim, tmp_path / "sim.onnx", inputs)
    b = fracpass.export_onnx(nat, tmp_path / "nat.onnx", inputs)
    assert a.SerializeToString() == b.SerializeToString()
    assert [(o.op, o.forward_macs) for o in fracpass.cost(nat).ops] == [(o.op, o.forward_macs)
                                                                       for o in fracpass.cost(sim).ops]


def test_bench_predicts_bf16_products_at_16_bits():
    from fracpass.bench import bench
    from fracpass.targets import load_target

    torch.manual_seed(0)
    model, inputs = Conv(nn.Conv2d(16, 32, 3, padding=1)), _inputs("", (8, 16, 16, 16))
    _, nat = _pair(model, fracpass.Plan.static(8, 8, 8), inputs)
    report = bench(nat, inputs, target="epyc9655", stages=[0], repeats=1, warmup=0, threads=1)
    st = report.stages[0]
    (op,) = st.ops
    assert op.path == "bf16" and op.runs_on == ("bf16", "bf16", "bf16")  # per-channel weights: g x w folded
    scaled = load_target("epyc9655").per_cores(1)
    fp32 = fracpass.cost(nat, stage=0).ops[0].products(None)
    lat = lambda p: scaled.latency_s(p[1], p[4], p[2], p[3])
    as_bf16 = lambda p: lat((p[0], p[1], 16, 16, p[4] / 2))
    assert len(fp32) == 2  # the model's input needs no gradient: the forward and g x a (dw), both on bf16
    assert op.as_run_s == pytest.approx(as_bf16(fp32[0]) + as_bf16(fp32[1]))
    assert "bf16/bf16/bf16" in str(report)


@pytest.mark.parametrize("shape, macs", [((2, 6, 8, 8), 2 * 8 * 64 * 54), ((128, 16, 32, 32), 128 * 16 * 1024 * 144)])
def test_convolutions_below_min_conv_macs_stay_simulated_and_say_why(shape, macs, monkeypatch):
    default = fracpass.NativeOptions()  # min_conv_macs=100e6
    torch.manual_seed(0)
    channels = shape[1]
    model, inputs = Conv(nn.Conv2d(channels, 8 if channels == 6 else 16, 3, padding=1)), (torch.randn(*shape),)
    assert native.decide._conv_macs(inputs[0], model.conv.weight, 1, 1, 1, False) == macs
    sim, nat = _pair(model, fracpass.Plan.static(8, 8, 8), inputs, default)
    calls = _count_bf16(monkeypatch)
    got, want = _run(nat, inputs), _run(sim, inputs)
    path, why = native.op_paths(nat)["conv"]
    if macs < 100e6:
        assert not calls and path == "simulated" and "a small convolution (0.1M multiply-adds" in why
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    else:
        assert calls == [1] and path == "bf16"


def test_conv_macs_counts_strided_dilated_grouped_and_transposed_windows():
    x = torch.zeros(2, 6, 9, 9)
    # stride 2, no padding: 4x4 outputs; grouped (3 groups): 2 input channels x 9 taps per output
    w = torch.zeros(9, 2, 3, 3)
    assert native.decide._conv_macs(x, w, 2, 0, 1, False) == 2 * 9 * 16 * 18
    # dilation 2, padding 2: 9x9 outputs
    assert native.decide._conv_macs(x, w, 1, 2, 2, False) == 2 * 9 * 81 * 18
    # transposed: every input element scatters C_out / groups x taps
    wt = torch.zeros(6, 4, 3, 3)
    assert native.decide._conv_macs(x, wt, 2, 1, 1, True) == x.numel() * 36
    got = torch.nn.functional.conv2d(torch.ones(2, 6, 9, 9), torch.ones(9, 2, 3, 3), stride=2, groups=3)
    assert got.shape[2:] == (4, 4) and float(got.sum()) == 2 * 9 * 16 * 18  # each output sums its 18 taps of ones


def test_a_full_precision_conv_says_so_rather_than_no_native_path():
    torch.manual_seed(0)
    model, inputs = Conv(nn.Conv2d(6, 8, 3, padding=1)), _inputs("", (2, 6, 8, 8))
    plan = fracpass.Plan.static(8, 8, 8, rules=[fracpass.Rule(match="conv", w=32, a=32, g=32)])
    _, nat = _pair(model, plan, inputs)
    path, why = native.op_paths(nat)["conv"]
    assert path == "simulated" and why.startswith("full precision at every stage"), why


def test_bench_reports_the_path_a_conv_took_at_the_benched_batch(monkeypatch):
    """A conv native at one batch and too small at another: bench reports the path of its own batch,
    not the one the model's last call (before bench) left."""
    from fracpass.bench import bench

    torch.manual_seed(0)
    model = Conv(nn.Conv2d(16, 16, 3, padding=1))
    big, small = torch.randn(16, 16, 16, 16), torch.randn(1, 16, 16, 16)  # 9.4M and 0.6M multiply-adds
    _, nat = _pair(model, fracpass.Plan.static(8, 8, 8), (big,), fracpass.NativeOptions(min_conv_macs=1e6))
    nat(big)
    assert native.op_paths(nat)["conv"][0] == "bf16"
    (op,) = bench(nat, (small,), target="epyc9655", stages=[0], repeats=1, warmup=0, threads=1).stages[0].ops
    assert op.path == "simulated" and op.runs_on == ("fp32",) * 3
    nat(small)
    (op,) = bench(nat, (big,), target="epyc9655", stages=[0], repeats=1, warmup=0, threads=1).stages[0].ops
    assert op.path == "bf16"
