"""The cost analysis pass and hardware targets."""
import copy
import json

import pytest
import sympy
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fracpass
from conftest import EXAMPLE_MODELS
from fracpass.targets import TargetError, load_target
from test_registry import CASES

PLAN = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8))


def flop_counter_macs(model, inputs):
    """Forward and backward MACs by torch's own counter (FLOPs / 2), counted separately."""
    model = copy.deepcopy(model)
    with FlopCounterMode(display=False) as forward:
        out = model(*inputs)
    if not out.requires_grad:  # no parameters upstream: nothing to differentiate
        return forward.get_total_flops() / 2, 0
    with FlopCounterMode(display=False) as backward:
        out.float().sum().backward()
    return forward.get_total_flops() / 2, backward.get_total_flops() / 2


def grouped_conv_overcount(model, inputs):
    """FlopCounterMode (torch 2.13) counts a grouped conv's weight gradient as if dense: `groups`
    times the true MACs (shared/DESIGN.md). Returns the excess it adds, to subtract."""
    excess = 0
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
            def hook(mod, inp, out):
                nonlocal excess
                true = (inp[0] if mod.transposed else out).numel() * mod.weight[0].numel()
                excess += (mod.groups - 1) * true
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return excess


@pytest.mark.parametrize("case", sorted(c for c in CASES if c not in ("sdpa",)))
def test_per_op_kind_macs_equal_flop_counter(case):
    module, inputs, *_ = CASES[case]
    qmodel = fracpass.transform(module, PLAN, example_inputs=inputs)
    report = fracpass.cost(qmodel)
    fwd, bwd = flop_counter_macs(module, inputs)
    assert report.forward_macs.per_batch == fwd
    assert report.backward_macs.per_batch == bwd - grouped_conv_overcount(module, inputs)


def test_sdpa_macs_by_formula():
    """FlopCounterMode does not count CPU scaled_dot_product_attention (shared/DESIGN.md)."""
    module, inputs, *_ = CASES["sdpa"]
    q_in = [t.clone().requires_grad_() for t in inputs]

    class WithGrad(nn.Module):  # inputs that need gradients, so the backward products exist
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q * self.scale, k * self.scale, v * self.scale)

    report = fracpass.cost(fracpass.transform(WithGrad(), PLAN, example_inputs=q_in))
    b, h, L, E = inputs[0].shape
    S, Ev = inputs[1].shape[2], inputs[2].shape[3]
    assert report.forward_macs.per_batch == b * h * L * S * (E + Ev)
    assert report.backward_macs.per_batch == 2 * b * h * L * S * (E + Ev)


@pytest.mark.parametrize("name", sorted(EXAMPLE_MODELS))
def test_example_models_macs_equal_flop_counter(name):
    factory, make_input = EXAMPLE_MODELS[name]
    model, x = factory(), make_input(3)
    for m in model.modules():
        if hasattr(m, "attention"):  # attention dropout off: with it, CPU SDPA takes the math path (bmm)
            m.dropout = 0.0
    report = fracpass.cost(fracpass.transform(model, PLAN, example_inputs=(x,)))
    fwd, bwd = flop_counter_macs(model, (x,))
    bwd -= grouped_conv_overcount(model, (x,))
    if name == "transformer_sdpa":  # CPU SDPA's fused kernel is invisible to FlopCounterMode: add ours
        sdpa = [r for r in report.rows() if r["kind"] == "sdpa"]
        fwd += sum(r["fwd_macs"] for r in sdpa)
        bwd += sum(r["bwd_error_macs"] for r in sdpa)
    assert report.forward_macs.per_batch == fwd
    assert report.backward_macs.per_batch == bwd
    assert report.forward_macs.per_sample == fwd / 3


class Scaled(nn.Module):
    """Every op has all three products: the first op's input comes from a parameter."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x * self.scale)))


@pytest.mark.parametrize("a, w, g", [(8, 8, 8), (4, 4, 6), (3, 3, 6), (6, 4, 8), (8, 8, 32), (32, 32, 32), (2, 8, 16)])
def test_relative_cost_is_fractrains_formula(a, w, g):
    qmodel = fracpass.transform(Scaled(), fracpass.Plan.static(w=w, a=a, g=g), example_inputs=(torch.randn(5, 8),))
    report = fracpass.cost(qmodel)
    assert report.relative_to_fp32() == pytest.approx(fracpass.relative_cost(a, w, g), rel=1e-12)
    assert report.relative_to_fp32() == pytest.approx((a * w + g * w + g * a) / 3072, rel=1e-12)


def test_relative_cost_reference_values():
    assert fracpass.relative_cost(8, 8, 8) == 1 / 16
    assert round(100 * fracpass.relative_cost(4, 4, 6), 2) == 2.08


def test_bitops_split_and_exclusions():
    qmodel = fracpass.transform(Scaled(), fracpass.Plan.static(w=4, a=8, g=6, exclude=("fc2",)),
                                example_inputs=(torch.randn(5, 8),))
    report = fracpass.cost(qmodel)
    macs = 5 * 8 * 16  # fc1 per batch
    b = report.bitops(per="batch")
    fc2 = 5 * 16 * 4
    assert b["forward"] == macs * 8 * 4 + fc2 * 32 * 32
    assert b["backward_error"] == macs * 6 * 4 + fc2 * 32 * 32
    assert b["backward_weight"] == macs * 6 * 8 + fc2 * 32 * 32
    assert b["total"] == b["forward"] + b["backward_error"] + b["backward_weight"]
    assert report.bitops()["total"] == b["total"] / 5
    rows = {r["op"]: r for r in report.per_op}
    assert rows["fc2"]["excluded"] and rows["fc1"]["w"] == 4
    assert sum(r["share"] for r in report.per_op) == pytest.approx(1.0)


def test_symbolic_equals_numeric_at_other_sizes():
    factory, _ = EXAMPLE_MODELS["resnet20"]
    model = factory()
    qmodel = fracpass.transform(model, PLAN, example_inputs=(torch.randn(2, 3, 32, 32),))
    report = fracpass.cost(qmodel)
    N, H, W = (report.symbols.get(k) for k in ("N", "H", "W")) if report.symbolic("total") is not None else (None,) * 3
    assert {str(s) for s in report.symbolic("total", stage=1).free_symbols} == {"N", "H", "W"}
    for batch, size in ((1, 32), (3, 32), (4, 24), (2, 40)):
        other = fracpass.cost(qmodel, example_inputs=(torch.randn(batch, 3, size, size),))
        subs = {N: batch, H: size, W: size}
        assert report.symbolic("forward_macs").subs(subs) == other.forward_macs.per_batch
        assert report.symbolic("backward_macs").subs(subs) == other.backward_macs.per_batch
        for key in ("forward", "backward_error", "backward_weight", "total"):
            assert report.symbolic(key, stage=2).subs(subs) == other.bitops(2, per="batch")[key]


def test_symbolic_on_the_export_path_is_in_batch_size():
    factory, make_input = EXAMPLE_MODELS["transformer_sdpa"]
    qmodel = fracpass.transform(factory(), PLAN, example_inputs=(make_input(2),), capture_method="export")
    report = fracpass.cost(qmodel)
    expr = report.symbolic("total", stage=0)
    assert {str(s) for s in expr.free_symbols} == {"N"}
    N = report.symbols["N"]
    for batch in (1, 5):
        other = fracpass.cost(qmodel, example_inputs=(make_input(batch),))
        assert expr.subs({N: batch}) == other.bitops(0, per="batch")["total"]
    assert sympy.simplify(expr / N).free_symbols == set()  # linear in N


def test_cost_leaves_the_model_untouched():
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    qmodel = fracpass.transform(factory(), PLAN, example_inputs=(make_input(2),))
    qmodel(make_input(4))
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    rng = torch.random.get_rng_state()
    fracpass.cost(qmodel, target="bitfusion").symbolic("total")
    assert all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())


def test_gpu_bit_rounding_and_report_note():
    a100, h100, xeon = load_target("a100"), load_target("h100"), load_target("xeon8380")
    assert a100.rate(3, 3).precision == "int4" and a100.rate(3, 3).rounded
    assert h100.rate(3, 3).precision in ("int8", "fp8") and h100.rate(3, 3).macs_per_s == 9.8945e14
    assert a100.rate(6, 8).precision == "int8" and a100.rate(12, 8).precision == "fp16"
    assert a100.rate(32, 32).precision == "fp32" and not a100.rate(32, 32).rounded
    assert xeon.rate(6, 4).precision == "int8-vnni" and xeon.rate(12, 8).precision == "fp32"
    qmodel = fracpass.transform(Scaled(), fracpass.Plan.static(w=3, a=3, g=6), example_inputs=(torch.randn(5, 8),))
    report = fracpass.cost(qmodel, target="a100")
    assert ("fc1", 3, 3, "int4") in report.rounding()
    assert "3x3-bit products run as int4" in str(report)


def test_bitfusion_throughput_rule():
    bf = load_target("bitfusion")
    base = bf.rate(8, 8).macs_per_s
    assert bf.rate(4, 4).macs_per_s == 4 * base and bf.rate(2, 2).macs_per_s == 16 * base
    assert bf.rate(3, 4).macs_per_s == 4 * base  # 3 bits use 4-bit bricks
    assert bf.rate(8, 2).macs_per_s == 4 * base and bf.rate(16, 8).macs_per_s == base / 2
    assert bf.rate(32, 32).macs_per_s == base / 16
    assert bf.energy_j(1e6, 0, 4, 4) == pytest.approx(bf.energy_j(1e6, 0, 8, 8) / 4)


def test_roofline_memory_bound_for_small_batch_depthwise_conv():
    dw = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64))
    qmodel = fracpass.transform(dw, fracpass.Plan.static(8, 8, 8), example_inputs=(torch.randn(1, 64, 16, 16),))
    op = fracpass.cost(qmodel).ops[0]
    a100 = load_target("a100")
    _, macs, bx, by, nbytes = op.products(0)[0]
    assert a100.memory_bound(macs, nbytes, bx, by)
    assert a100.latency_s(macs, nbytes, bx, by) == nbytes / a100.bandwidth_bytes_per_s
    dense = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1))
    big = fracpass.cost(fracpass.transform(dense, fracpass.Plan.static(8, 8, 8),
                                           example_inputs=(torch.randn(64, 256, 32, 32),))).ops[0]
    _, macs, bx, by, nbytes = big.products(0)[0]
    assert not a100.memory_bound(macs, nbytes, bx, by)


def test_energy_latency_and_training_totals():
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    qmodel = fracpass.transform(factory(), PLAN, example_inputs=(make_input(2),))
    report = fracpass.cost(qmodel, target="bitfusion")
    lat = [report.latency_s(k) for k in range(4)]
    en = [report.energy_j(k) for k in range(4)]
    assert lat == sorted(lat) and en == sorted(en) and lat[0] < lat[3] / 2
    totals = report.training(steps_per_stage=[100, 100, 100, 100], batch_size=128)
    per_stage = [report.bitops(k)["total"] * 128 * 100 for k in range(4)]
    assert totals.bitops == pytest.approx(sum(per_stage))
    assert totals.static_bitops == pytest.approx(400 * 128 * report.bitops(3)["total"])
    assert 0 < totals.bitops_saving < 1 and 0 < totals.latency_saving < 1
    assert "less" in str(totals)
    with pytest.raises(fracpass.FracpassError, match=r"one non-negative step count for each of the plan's 4 stages"):
        report.training(steps_per_stage=[1, 2])
    data = json.loads(report.to_json())
    assert data["target"] == "bitfusion" and len(data["stages"]) == 4 and data["per_op"]


def test_no_target_errors_clearly():
    report = fracpass.cost(fracpass.transform(Scaled(), PLAN, example_inputs=(torch.randn(2, 8),)))
    with pytest.raises(fracpass.FracpassError, match=r"no hardware target; pass target='bitfusion'"):
        report.latency_s()


def test_target_errors_name_file_and_field(tmp_path):
    with pytest.raises(TargetError, match=r"unknown target 'tpu'; built-in targets: a100, bitfusion, epyc9655, h100, xeon8380"):
        load_target("tpu")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nkind = "gpu"\n[memory]\nbandwidth_bytes_per_s = 1e9\n[power]\nwatts = 10\n'
                   '[[precisions]]\nname = "int8"\nbits = 8\nmacs_per_s = -1\n')
    with pytest.raises(TargetError, match=r"bad\.toml precisions\[0\]: field 'macs_per_s' = -1\.0 must be positive"):
        load_target(bad)
    bad.write_text('name = "x"\nkind = "asic"\n')
    with pytest.raises(TargetError, match=r"bad\.toml: field 'kind' = 'asic' must be one of"):
        load_target(bad)
    bad.write_text('name = "x"\nkind = "gpu"\n[memory]\nbandwidth_bytes_per_s = 1e9\n')
    with pytest.raises(TargetError, match=r"needs \[\[precisions\]\] tables"):
        load_target(bad)
    bad.write_text('kind = "gpu"\n')
    with pytest.raises(TargetError, match=r"missing field 'name'"):
        load_target(bad)
    with pytest.raises(TargetError, match=r"has no precision for 64-bit operands"):
        load_target("a100").rate(64, 8)


def test_uncosted_leaf_module_is_listed():
    class WithLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 4, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    report = fracpass.cost(fracpass.transform(WithLSTM(), PLAN, example_inputs=(torch.randn(2, 3, 4),)))
    assert [r["op"] for r in report.per_op] == ["fc"]
    assert report.not_costed and "inside leaf module 'rnn' (LSTM)" in report.not_costed[0][1]
    assert "not costed: rnn" in str(report)
