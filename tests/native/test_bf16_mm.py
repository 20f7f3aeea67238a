"""Batched products (torch.bmm, torch.matmul with a batched right operand: attention's q k^T and P v)
on bfloat16 codes (fracpass.native.bf16_mm: the fracpass::bf16_mm op, fracpass::gated_bmm for gated ones) against the
simulation.

The codes are exact in bfloat16 and the products accumulate in float32; what differs from the
simulation is the rounding of each product's output to bfloat16 (unit roundoff u = 2^-8) before the
scales are applied. So each element may differ by at most u times the magnitude of its unscaled
product, which these tests bound elementwise from above with the operands' magnitudes padded by one
quantization step: |y - y_sim| <= u |a| @ |b|, |da - da_sim| <= u |g| @ |b|^T, |db - db_sim| <=
u |a|^T @ |g| (summed over the entries a broadcast operand was repeated in), with |g| the loss
gradient padded by 1.5 gradient steps (|s_g t| <= |ghat| + |c|, |c| <= s_g / 2), plus float32
summation (1e-5 of the tensor's range). The gradient quantizer's noise is fixed by seed, as in
tests/native/test_native.py.

Gated products (DFQ) quantize each sample at its gate's option: the samples lie on dim 0, which no
product contracts, so every scale is per sample and the bound is the same with the coarsest option's
steps. The gate's gradient sums both operands' <dL/d operand, Q_k(operand)>: its error is at most
each gradient's bound times the padded operand, summed over the sample, and it must equal that sum
computed from native's own gradients.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native
from test_native import _run, kernels  # noqa: F401  (kernels: a fixture)

# small operands keep the tests fast; the bf16 path normally leaves them to the simulation
OPTS = fracpass.NativeOptions(min_bmm_intensity=0.0)

BF16_U = 2.0**-8


@pytest.fixture(autouse=True)
def bf16_every_size(monkeypatch):
    if native.bf16_support() is not None:
        pytest.skip("this CPU has no bfloat16 dot-product instructions: batched products run simulated")


class Bmm(nn.Module):
    def forward(self, a, b):
        return torch.bmm(a, b)


class Scores(nn.Module):  # attention's q k^T on heads: a transposed (non-contiguous) right operand
    def forward(self, q, k):
        return torch.matmul(q, k.transpose(-2, -1))


class MatmulBatched(nn.Module):
    def forward(self, a, b):
        return a @ b


def _offset(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape, generator=torch.Generator().manual_seed(x.numel())) * 3 - 0.5


# name: (model, operands); operands asymmetric (zero point away from the middle) where it matters
CASES = {
    "bmm": (Bmm, lambda: (torch.randn(3, 10, 24), _offset(torch.empty(3, 24, 16)))),
    "scores 4-D, k transposed": (Scores, lambda: (torch.randn(2, 3, 12, 8), torch.rand(2, 3, 14, 8))),
    "matmul, left broadcast (2-D)": (MatmulBatched, lambda: (torch.randn(10, 24), _offset(torch.empty(3, 24, 16)))),
    "matmul, batch dims broadcast": (MatmulBatched, lambda: (torch.randn(2, 1, 10, 24), torch.randn(1, 4, 24, 16))),
}


def _pair(model, plan, inputs, opts=OPTS):
    return (fracpass.transform(model, plan, example_inputs=inputs),
            fracpass.transform(model, plan, example_inputs=inputs, execution="native", native=opts))


def _step(x: torch.Tensor, bits: int) -> float:
    return float(x.max().clamp(min=0) - x.min().clamp(max=0)) / (2**bits - 1)


def _bounds(model, inputs, y_shape, bits):
    """Elementwise upper bounds of |native - simulated| for (y, da, db) from bfloat16 output rounding:
    u times the plain product of the padded magnitudes, and its vector-Jacobian products with the
    padded |dL/dy| (a bilinear product's: |g| @ |b|^T and |a|^T @ |g|, summed over broadcast entries)."""
    pads = [(x.abs() + _step(x, bits)).requires_grad_() for x in inputs]
    r = torch.randn(y_shape, generator=torch.Generator().manual_seed(7))  # _run's dL/dy
    y = model(*pads)
    y.backward(r.abs() + 1.5 * float(r.max() - r.min()) / (2**bits - 1))
    return [BF16_U * y.detach()] + [BF16_U * p.grad for p in pads]


def _assert_within(got, want, bounds, what):
    for i, (g, w, bound) in enumerate(zip(got, want, bounds)):
        spread = 1e-5 * (float(w.max() - w.min()) or 1.0)
        excess = float(((g - w).abs() - bound).max())
        assert excess <= spread, (f"{what}: tensor {i} exceeds its bfloat16 bound by {excess:.3g} "
                                  f"(largest error {float((g - w).abs().max()):.3g}, |want| up to {float(w.abs().max()):.3g})")


def _count_bf16(monkeypatch):
    """Counts the static batched products on bf16 (bf16_mm.product: the fracpass::bf16_mm op)."""
    calls = []
    real = native.bf16_mm.product
    monkeypatch.setattr(native.bf16_mm, "product", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_products_match_the_simulation_within_bf16_rounding(case, bits, kernels, monkeypatch):
    factory, make = CASES[case]
    torch.manual_seed(0)
    inputs = make()
    sim, nat = _pair(factory(), fracpass.Plan.static(w=bits, a=bits, g=bits), inputs)
    calls = _count_bf16(monkeypatch)
    want, got = _run(sim, inputs), _run(nat, inputs)
    assert calls, "the batched product did not run on bf16"
    name = next(iter(native.op_paths(nat)))
    assert native.op_paths(nat)[name] == ("bf16", "")
    assert [t.shape for t in got] == [t.shape for t in want]
    _assert_within(got, want, _bounds(factory(), inputs, want[0].shape, bits), f"{case} at {bits} bits")


def test_the_bound_is_tight_enough_to_catch_a_dropped_offset(monkeypatch):
    """The gradient offset c (ghat = s_g t + c) matters: without its correction the gradients leave the bound."""
    factory, make = CASES["bmm"]
    torch.manual_seed(0)
    inputs = make()
    sim, nat = _pair(factory(), fracpass.Plan.static(8, 8, 4), inputs)
    real = native.codes.bf16_grad_codes

    def no_offset(*args, **kwargs):
        ghat, t, sg, c, kept = real(*args, **kwargs)
        return ghat, t, sg, torch.zeros_like(c), kept

    monkeypatch.setattr(native.codes, "bf16_grad_codes", no_offset)
    want, got = _run(sim, inputs), _run(nat, inputs)
    with pytest.raises(AssertionError, match="tensor 1 exceeds"):
        _assert_within(got, want, _bounds(factory(), inputs, want[0].shape, 4), "no offset")


@pytest.mark.parametrize("gbits", [12, 32])
def test_a_gradient_above_8_bits_runs_backward_in_fp32(gbits, monkeypatch):
    factory, make = CASES["matmul, left broadcast (2-D)"]
    torch.manual_seed(0)
    inputs = make()
    sim, nat = _pair(factory(), fracpass.Plan.static(8, 8, gbits), inputs)
    want, got = _run(sim, inputs), _run(nat, inputs)
    path, note = native.op_paths(nat)["matmul"]
    assert path == "bf16" and note.startswith("backward products in fp32")
    _assert_within(got[:1], want[:1], _bounds(factory(), inputs, want[0].shape, 8)[:1], "forward")
    for g, w in zip(got[1:], want[1:]):  # float32 products on the decoded codes: float32 rounding only
        assert float((g - w).abs().max()) <= 1e-5 * float(w.max() - w.min())


def test_saved_for_backward_are_bf16_codes():
    torch.manual_seed(0)
    a, b = (t.requires_grad_() for t in CASES["bmm"][1]())
    _, nat = _pair(Bmm(), fracpass.Plan.static(8, 8, 8), (a.detach(), b.detach()))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nat(a, b).sum().backward()
    big = [t.dtype for t in saved if t.numel() in (a.numel(), b.numel())]
    assert big == [torch.bfloat16, torch.bfloat16], big


@pytest.mark.parametrize("bits", [9, 16])
def test_bits_above_8_are_simulated_bit_for_bit(bits, monkeypatch):
    torch.manual_seed(0)
    inputs = CASES["bmm"][1]()
    sim, nat = _pair(Bmm(), fracpass.Plan.static(bits, bits, 8), inputs)
    calls = _count_bf16(monkeypatch)
    for g, w in zip(_run(nat, inputs), _run(sim, inputs)):
        assert torch.equal(g, w)
    assert not calls
    path, why = native.op_paths(nat)["bmm"]
    assert path == "simulated" and f"at {bits} bits" in why


def test_small_and_per_channel_and_vector_products_fall_back_with_the_reason(monkeypatch):
    default = fracpass.NativeOptions()  # min_bmm_intensity=20
    torch.manual_seed(0)
    inputs = (torch.randn(4, 6, 8), torch.randn(4, 8, 5))  # intensity 2
    sim, nat = _pair(Bmm(), fracpass.Plan.static(8, 8, 8), inputs, default)
    calls = _count_bf16(monkeypatch)
    for g, w in zip(_run(nat, inputs), _run(sim, inputs)):
        assert torch.equal(g, w)
    assert not calls
    why = native.op_paths(nat)["bmm"][1]
    assert "small batched product (6x8x5 per batch entry" in why and "min_bmm_intensity = 20" in why

    vec = (torch.randn(3, 10, 24), torch.randn(24))
    sim, nat = _pair(MatmulBatched(), fracpass.Plan.static(8, 8, 8), vec)
    for g, w in zip(_run(nat, vec), _run(sim, vec)):
        assert torch.equal(g, w)
    assert "1-D operand" in native.op_paths(nat)["matmul"][1]

    class BatchedWeight(nn.Module):  # a 3-D parameter: per-channel weight scale by default
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 24, 16))

        def forward(self, a):
            return torch.matmul(a, self.w)

    x = (torch.randn(3, 10, 24),)
    sim, nat = _pair(BatchedWeight(), fracpass.Plan.static(8, 8, 8), x)
    for g, w in zip(_run(nat, x), _run(sim, x)):
        assert torch.equal(g, w)
    assert "per-channel weight scale" in native.op_paths(nat)["matmul"][1]


def test_bmm_reports_bf16_before_its_first_call_and_matmul_after_a_batched_one():
    inputs = CASES["bmm"][1]()
    _, nat = _pair(Bmm(), fracpass.Plan.static(8, 8, 8), inputs)
    assert native.op_paths(nat)["bmm"] == ("bf16", "")
    assert native.product_paths(nat)["bmm"] == ("bf16", "bf16", "bf16")
    inputs = CASES["matmul, left broadcast (2-D)"][1]()
    _, nat = _pair(MatmulBatched(), fracpass.Plan.static(8, 8, 8), inputs)
    assert native.op_paths(nat)["matmul"][0] == "int8"  # a 2-D right operand's path until a call says otherwise
    nat(*inputs)
    assert native.op_paths(nat)["matmul"] == ("bf16", "")


def test_attention_as_matmuls_runs_both_products_on_bf16_and_trains(monkeypatch):
    """models.transformer(attention="matmul"): q k^T and P v (P quantized by the plan, dropout on) on
    bf16; SDPA's model keeps its attention simulated and says why."""
    torch.manual_seed(0)
    x = torch.randint(0, 100, (8, 16))
    y = torch.randint(0, 10, (8,))
    plan = fracpass.Plan.static(8, 8, 8)
    model = fracpass.models.transformer(attention="matmul")
    layers = len(model.layers)
    nat = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=OPTS)
    calls = _count_bf16(monkeypatch)
    opt = torch.optim.SGD(nat.parameters(), lr=0.05)
    losses = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(nat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert len(calls) == 12 * 2 * layers  # two batched products per layer and step
    batched = {k: v for k, v in native.op_paths(nat).items() if "matmul" in k}
    assert len(batched) == 2 * layers and all(v == ("bf16", "") for v in batched.values()), batched
    assert all(torch.isfinite(p.grad).all() for p in nat.parameters() if p.grad is not None)
    assert losses[-1] < losses[0]

    sdpa = fracpass.transform(fracpass.models.transformer(attention="sdpa"), plan, example_inputs=(x,),
                              execution="native", native=OPTS)
    reasons = {v for k, v in native.op_paths(sdpa).items() if "scaled_dot_product" in k or "sdpa" in k}
    assert reasons and all(p == "simulated" and "attention written as two matmuls" in why for p, why in reasons)


def test_deepcopy_pickle_state_dict_and_onnx_export_as_for_simulated(tmp_path):
    torch.manual_seed(0)
    inputs = CASES["scores 4-D, k transposed"][1]()
    sim, nat = _pair(Scores(), fracpass.Plan.static(8, 8, 8), inputs)
    _run(sim, inputs), _run(nat, inputs)  # a training batch: EMA ranges
    for clone in (copy.deepcopy(nat), pickle.loads(pickle.dumps(nat))):
        clone.eval(), nat.eval()
        with torch.no_grad():
            assert torch.equal(clone(*inputs), nat(*inputs))
        nat.train()
    assert sim.state_dict().keys() == nat.state_dict().keys()
    pytest.importorskip("onnx")
    sim.eval(), nat.eval()
    a = fracpass.export_onnx(sim, tmp_path / "sim.onnx", inputs)
    b = fracpass.export_onnx(nat, tmp_path / "nat.onnx", inputs)
    assert a.SerializeToString() == b.SerializeToString()


# -- gated (DFQ) batched products: per-sample bits and scales ------------------------------------------
def _gated_pair(model, inputs, a=(2, 4, 6, 8), g=(8, 6, 4, 8)):
    """The product gated per op, simulated and native, with the same random gate weights (so that the
    batch's samples spread over several options)."""
    gates = fracpass.Gates(a=a, g=g, w=5, granularity="op", target=3.0)
    plan = fracpass.Plan(stages=(fracpass.Stage(w=5, a=max(a), g=max(g)),), gates=gates)
    sim, nat = _pair(model, plan, inputs)
    with torch.no_grad():
        for p in sim.gates.parameters():
            p.normal_(0, 3, generator=torch.Generator().manual_seed(p.numel()))
    nat.load_state_dict(sim.state_dict())
    return sim, nat


def _spread_inputs(n=8):
    """q and k of attention scores whose samples differ in scale and sign (the gate's choices differ)."""
    f = torch.linspace(-3, 3, n).view(n, 1, 1, 1)
    return torch.randn(n, 2, 12, 16) * f, torch.rand(n, 2, 10, 16) * f.abs() + 0.1


def _gate_grads(*qmodels):
    """Per model: its gate's one-hot choice and dL/d(one-hot), as its backward computes it."""
    seen = [[] for _ in qmodels]
    def keep(out):
        def hook(module, args, res):
            out.append(res[0].detach())  # the one-hot, then (in backward) its gradient
            res[0].register_hook(out.append)  # returns None: the output stays as it is
        return hook

    for q, out in zip(qmodels, seen):
        q.gates.register_forward_hook(keep(out))
    return seen


def _gated_bounds(model, inputs, y_shape, a_bits, g_bits):
    """_bounds with the operands padded by the coarsest activation option's step and the gradient by the
    coarsest gradient option's: (y's bound, [da's, db's], the padded operands)."""
    pads = [(x.abs() + _step(x, a_bits)).requires_grad_() for x in inputs]
    r = torch.randn(y_shape, generator=torch.Generator().manual_seed(7))  # _run's dL/dy
    y = model(*pads)
    y.backward(r.abs() + 1.5 * float(r.max() - r.min()) / (2**g_bits - 1))
    return BF16_U * y.detach(), [BF16_U * p.grad for p in pads], [p.detach() for p in pads]


def _gated_case(case: str):
    """(model, inputs) of a gated batched product: attention's scores q k^T ("scores") or a bmm of the same
    operands flattened ("bmm"), with samples of different spans."""
    if case == "scores":
        return Scores(), _spread_inputs()
    q, k = _spread_inputs()
    return Bmm(), (q.flatten(1, 2), k.flatten(1, 2).transpose(1, 2).contiguous())


@pytest.mark.parametrize("case", ["scores", "bmm"])
def test_gated_batched_product_matches_the_gated_simulation(case, kernels, monkeypatch):
    torch.manual_seed(0)
    model, inputs = _gated_case(case)
    sim, nat = _gated_pair(model, inputs)
    seen = _gate_grads(sim, nat)
    calls, real = [], native.bf16_mm.gated_bmm  # gated products: fracpass::gated_bmm
    monkeypatch.setattr(native.bf16_mm, "gated_bmm", lambda *a: calls.append(1) or real(*a))
    want, got = _run(sim, inputs), _run(nat, inputs)
    assert calls == [1] and native.op_paths(nat)[next(iter(native.op_paths(nat)))] == ("bf16", "")
    (chosen,) = sim.gates.stats().units.values()
    assert sum(share > 0 for share in chosen) >= 2, f"the batch took one option only ({chosen})"
    y_bound, (da_bound, db_bound), pads = _gated_bounds(model, inputs, want[0].shape, a_bits=2, g_bits=4)
    _assert_within(got[:3], want[:3], [y_bound, da_bound, db_bound], f"gated {case}")

    # the gate's gradient: both operands' <dL/d operand, Q_k(operand)>; each term's error is at most its
    # gradient's elementwise bound times |Q_k(operand)| <= the padded operand, summed over the sample
    (_, d_sim), (onehot, d_nat) = seen
    # native's own gradients give its gate's gradient: both operands' terms, at the options' ranges
    aq = next(m for m in nat.modules() if isinstance(m, fracpass.gating.GatedActQuant))
    choice, levels = onehot.argmax(1), aq.option_levels.float()
    terms = []
    for x, dx in zip(inputs, got[1:3]):
        mn, mx = fracpass.gating.range_per_row(x)
        mn, mx, _, _ = fracpass.gating.range_per_group(mn, mx, choice, levels.numel())
        terms.append(fracpass.gating.onehot_grad(x, mn, mx, levels, onehot, dx))
    assert torch.allclose(d_nat, terms[0] + terms[1], rtol=1e-5, atol=1e-5 * float(d_nat.abs().max()))
    n = inputs[0].shape[0]
    spread = 1e-5 * (float(want[1].abs().max()) * float(pads[0].sum()) + float(want[2].abs().max()) * float(pads[1].sum()))
    row_bound = ((da_bound * pads[0]).reshape(n, -1).sum(1) + (db_bound * pads[1]).reshape(n, -1).sum(1)).view(n, 1)
    excess = float(((d_nat - d_sim).abs() - row_bound).max())
    assert excess <= spread, f"the gate's gradient exceeds its bound by {excess:.3g}"


def test_gated_samples_above_8_gradient_bits_run_their_entries_in_fp32(monkeypatch):
    torch.manual_seed(0)
    model, inputs = Scores(), _spread_inputs()
    sim, nat = _gated_pair(model, inputs, a=(4, 6, 8), g=(6, 12, 8))
    path, note = native.op_paths(nat)["matmul"]
    assert path == "bf16" and "gradient option above 8 bits (gate options g=(6, 12, 8))" in note
    choices = []
    nat.gates.register_forward_hook(lambda m, args, out: choices.append(out[0].detach().argmax(1)))
    want, got = _run(sim, inputs), _run(nat, inputs)
    wide = choices[0] == 1
    assert 0 < int(wide.sum()) < wide.numel(), f"choices {choices[0].tolist()}: want some samples at 12 bits"
    for g, w in zip(got[1:3], want[1:3]):  # the 12-bit samples: float32 products on ghat
        assert float((g[wide] - w[wide]).abs().max()) <= 1e-5 * float(w.abs().max())
    y_bound, (da_bound, db_bound), _ = _gated_bounds(model, inputs, want[0].shape, a_bits=4, g_bits=6)
    _assert_within(got[:3], want[:3], [y_bound, da_bound, db_bound], "gated, some samples at 12 bits")


def test_gated_batch_at_one_option_runs_with_one_scale_and_eval_uses_the_option_ranges(monkeypatch):
    torch.manual_seed(0)
    model, inputs = Scores(), _spread_inputs()
    sim, nat = _gated_pair(model, inputs)
    with torch.no_grad():  # equal logits: every sample takes option 0
        for m in (sim, nat):
            for p in m.gates.parameters():
                p.zero_()
    scales = []
    real = native.bf16_mm.gated_bmm
    monkeypatch.setattr(native.bf16_mm, "gated_bmm", lambda *a: scales.append(a[4].numel()) or real(*a))
    want, got = _run(sim, inputs), _run(nat, inputs)
    assert scales == [1]
    y_bound, (da_bound, db_bound), _ = _gated_bounds(model, inputs, want[0].shape, a_bits=2, g_bits=8)
    _assert_within(got[:3], want[:3], [y_bound, da_bound, db_bound], "one option")
    sim.eval(), nat.eval()
    with torch.no_grad():
        y_sim, y_nat = sim(*inputs), nat(*inputs)
    _assert_within([y_nat], [y_sim], [y_bound], "eval")


def test_a_gated_attention_transformer_runs_its_matmuls_on_bf16_and_trains(tmp_path):
    torch.manual_seed(0)
    x = torch.randint(0, 100, (8, 16))
    y = torch.randint(0, 10, (8,))
    model = fracpass.models.transformer(attention="matmul")
    nat = fracpass.transform(model, fracpass.Plan.fractrain("cifar"), example_inputs=(x,), execution="native", native=OPTS)
    opt = torch.optim.SGD(nat.parameters(), lr=0.05)
    for _ in range(3):
        loss = nn.functional.cross_entropy(nat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    products = {k: v for k, v in native.op_paths(nat).items() if k.startswith("matmul")}
    assert len(products) == 2 * len(model.layers) and all(p == "bf16" for p, _ in products.values()), products
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in nat.gates.parameters())


def test_gated_batched_product_exports_as_the_simulated_one(tmp_path):
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model, inputs = Scores(), _spread_inputs()
    sim, nat = _gated_pair(model, inputs)
    _run(sim, inputs), _run(nat, inputs)  # a training batch each: the options' EMA ranges
    sim.eval(), nat.eval()
    a = fracpass.export_onnx(sim, tmp_path / "sim.onnx", inputs)
    b = fracpass.export_onnx(nat, tmp_path / "nat.onnx", inputs)
    assert a.SerializeToString() == b.SerializeToString()
