"""Native execution on CUDA (fracpass.native): device checks, CUDA's shape limits, the FP8 products.

No GPU has run this project's CI (the README says which paths have run on one). What runs here:

* the device decisions, as functions of the device and its compute capability (faked);
* "emulated CUDA": CPU tensors routed as CUDA ones (``native.units.device_kind`` says "cuda", the GPU is
  an sm_90). The CPU kernels are off (calling them fails the test), torch._int_mm and torch._scaled_mm
  are wrapped to enforce CUDA's shape and layout limits, and FP8 products run on torch's CPU
  _scaled_mm. The results must match the simulation as the CPU path's do;
* with a GPU, the same comparisons on CUDA tensors (skipped without one).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native
from test_native import Lin, _assert_close, _pair, _run
from test_bf16_conv import Conv, _assert_within_bf16

CUDA = torch.device("cuda")


# Small operands run native here (the tests check arithmetic and routing, not speed); _pair (test_native)
# takes the same thresholds.
# channels_last=False: each test's layout as given (test_layout.py checks the default conversion)
OPTS = fracpass.NativeOptions(min_intensity=0.0, min_conv_macs=0, min_bmm_intensity=0.0, channels_last=False)


# -- decisions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap, int8, bf16, fp8", [
    ((7, 0), False, False, False),  # Volta: no int8 or bf16 tensor cores
    ((7, 5), True, False, False),  # Turing: int8
    ((8, 0), True, True, False),  # Ampere: int8, bf16
    ((8, 9), True, True, True),  # Ada: FP8 too
    ((9, 0), True, True, True),  # Hopper
])
def test_gpu_paths_follow_the_compute_capability(cap, int8, bf16, fp8, monkeypatch):
    monkeypatch.setattr(native.units, "device_kind", lambda d: torch.device(d).type)
    monkeypatch.setattr(native.units, "_cuda_capability", lambda d: cap)
    monkeypatch.setattr(native.units, "_warned", set())
    assert (native.int8_support(CUDA) is None) == int8
    assert (native.bf16_support(CUDA) is None) == bf16
    assert (native.units.fp8_support(CUDA) is None) == fp8
    if not int8:
        assert f"sm_{cap[0]}{cap[1]}" in native.int8_support(CUDA)


def test_cuda_tensors_without_cuda_and_other_devices_say_why(monkeypatch):
    monkeypatch.setattr(native.units, "_cuda_capability", lambda d: None)
    monkeypatch.setattr(native.units, "device_kind", lambda d: torch.device(d).type)
    assert "CUDA is not available" in native.int8_support(CUDA)
    assert "mps tensors" in native.bf16_support(torch.device("mps"))
    monkeypatch.setattr(native.units, "device_kind", lambda d: "rocm")
    assert "rocm tensors" in native.int8_support(CUDA)
    assert native.units.fp8_support(torch.device("cpu")) is not None  # no CPU here multiplies FP8 in hardware


def test_int_mm_limits_apply_on_cuda_only():
    cpu = torch.device("cpu")
    assert native.decide._cuda_mm_reason(cpu, 5, 7, 3) is None  # oneDNN takes any shape
    assert native.decide._cuda_mm_reason(CUDA, 32, 48, 40) is None
    for m, k, n in [(16, 48, 40), (32, 16, 40), (36, 48, 40), (32, 44, 40), (32, 48, 36)]:
        assert "multiples of 8" in native.decide._cuda_mm_reason(CUDA, m, k, n), (m, k, n)


def test_fp8_takes_codes_of_at_most_4_bits_and_gradients_of_at_most_5(monkeypatch):
    monkeypatch.setattr(native.units, "fp8_support", lambda d: None)
    pick = lambda a, w, g, m=32, k=48, n=32: native.decide.fp8_products(CUDA, a, w, g, m, k, n)
    assert pick(4, 4, 5) == (True, True, True)
    assert pick(3, 4, 6) == (True, False, False)  # FracTrain's first stage: the forward on FP8
    assert pick(5, 4, 5) == (False, True, False)
    assert pick(4, 5, 4) == (False, False, True)
    assert pick(4, 4, 5, n=40) == (False, False, False)  # torch._scaled_mm on CUDA: dimensions multiples of 16
    assert pick(4, 4, 5, k=native.options.MAX_FP8_CONTRACTION + 16) == (False, True, True)  # float32 sums stay exact
    monkeypatch.setattr(native.units, "fp8_support", lambda d: "no FP8 units")
    assert pick(2, 2, 2) == (False, False, False)


def test_transform_puts_the_modules_it_adds_on_the_models_device(monkeypatch):
    """The quantizers and gates the passes add are made on the CPU; a CUDA model must come back whole on
    CUDA (found: its quantizers' buffers stayed on the CPU). The meta device stands in for CUDA here;
    set_stage reads a value, which a meta tensor cannot give, so it is left out of this transform."""
    from fracpass import api
    from fracpass.api import _follow_device

    make = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    plan = fracpass.Plan(stages=(fracpass.Stage(w=4, a=8, g=8),),
                         gates=fracpass.Gates(a=(4, 8), g=(6, 8), w=4, granularity="op", target=5.0))
    with monkeypatch.context() as m:
        m.setattr(api, "set_stage", lambda *a: None)
        qmodel = fracpass.transform(make().to("meta"), plan, example_inputs=(torch.randn(2, 8, device="meta"),))
    assert any(name.endswith("_aq") for name, _ in qmodel.named_modules())
    assert {t.device.type for t in (*qmodel.buffers(), *qmodel.parameters())} == {"meta"}
    spread = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4).to("meta"))  # across devices: left as they are
    qmodel = fracpass.transform(make(), plan, example_inputs=(torch.randn(2, 8),))
    _follow_device(qmodel, spread)
    assert {t.device.type for t in qmodel.buffers()} == {"cpu"}


# -- emulated CUDA -----------------------------------------------------------------------------------
def _emulate(monkeypatch) -> dict:
    """Route CPU tensors as CUDA ones on an sm_90; returns the int8 and FP8 products run."""
    monkeypatch.setattr(native.units, "device_kind", lambda d: "cuda")
    monkeypatch.setattr(native.units, "_cuda_capability", lambda d: (9, 0))

    def no_cpu_kernels():
        raise AssertionError("the CUDA route called a CPU kernel")

    monkeypatch.setattr(native.units, "_cpu_ext", no_cpu_kernels)
    calls = {"int8": [], "fp8": []}
    real_int_mm, real_scaled_mm = torch._int_mm, torch._scaled_mm

    def int_mm(a, b):  # aten/src/ATen/native/cuda/Blas.cpp, _int_mm_out_cuda
        assert a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0, (a.shape, b.shape)
        calls["int8"].append((tuple(a.shape), tuple(b.shape)))
        return real_int_mm(a, b)

    def scaled_mm(a, b, *, scale_a, scale_b, out_dtype):  # _scaled_mm_out_cuda's checks
        assert a.dtype == b.dtype == torch.float8_e4m3fn
        assert a.is_contiguous() and b.t().is_contiguous(), "row-major x column-major"
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0, (a.shape, b.shape)
        assert scale_a.numel() == scale_b.numel() == 1 and scale_a.dtype == scale_b.dtype == torch.float32
        assert scale_a.device == a.device and out_dtype == torch.float32
        calls["fp8"].append((tuple(a.shape), tuple(b.shape)))
        return real_scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)

    monkeypatch.setattr(torch, "_int_mm", int_mm)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    return calls


@pytest.fixture
def emulated_cuda(monkeypatch):
    return _emulate(monkeypatch)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_emulated_cuda_linear_runs_int8_and_fp8_products_as_the_simulation(bits, emulated_cuda):
    """Per-tensor weights, so all three products run on codes: on FP8 where both operands' codes fit
    e4m3 exactly (activations and weights <= 4 bits, gradients <= 5), else on int8."""
    torch.manual_seed(0)
    inputs = (torch.rand(32, 48) * 3 - 1,)
    plan = fracpass.Plan.static(w=bits, a=bits, g=bits, rules=[fracpass.Rule(weight_scale="tensor")])
    sim, nat = _pair(Lin(48, 32), plan, inputs)
    want = _run(sim, inputs)
    assert emulated_cuda == {"int8": [], "fp8": []}
    got = _run(nat, inputs)
    fp8 = 3 if bits <= 4 else 0
    assert (len(emulated_cuda["fp8"]), len(emulated_cuda["int8"])) == (fp8, 3 - fp8)
    _assert_close(got, want, f"emulated CUDA linear at {bits} bits")
    runs = "fp8" if bits <= 4 else "int8"
    assert native.product_paths(nat)["fc"] == (runs, runs, runs)
    path, note = native.op_paths(nat)["fc"]
    assert path == "int8" and (("FP8" in note) == (bits <= 4)), note


def test_emulated_cuda_fracTrain_first_stage_runs_its_forward_on_fp8(emulated_cuda):
    torch.manual_seed(0)
    inputs = (torch.randn(64, 48),)
    plan = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8))
    model = Lin(48, 32)
    sim, nat = _pair(model, plan, inputs)
    want = _run(sim, inputs)
    got = _run(nat, inputs)
    assert len(emulated_cuda["fp8"]) == 1 and len(emulated_cuda["int8"]) == 1  # forward FP8, g x a int8
    _assert_close(got, want, "stage 0 (3/3/6)", model, 6)  # g x w on bf16 over the folded per-channel weight
    assert native.product_paths(nat)["fc"] == ("fp8", "bf16", "int8")  # per-channel weights: g x w folded, bf16
    fracpass.set_stage(nat, 2)
    fracpass.set_stage(sim, 2)
    _run(nat, inputs)
    assert len(emulated_cuda["fp8"]) == 1  # 6 bits: int8 only
    assert native.product_paths(nat)["fc"] == ("int8", "bf16", "int8")


def test_emulated_cuda_leaves_shapes_int_mm_refuses_to_the_simulation(emulated_cuda):
    torch.manual_seed(0)
    inputs = (torch.randn(12, 48),)  # 12 rows: torch._int_mm on CUDA needs more than 16
    sim, nat = _pair(Lin(48, 32), fracpass.Plan.static(8, 8, 8), inputs)
    want, got = _run(sim, inputs), _run(nat, inputs)
    assert emulated_cuda == {"int8": [], "fp8": []}
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    path, why = native.op_paths(nat)["fc"]
    assert path == "simulated" and "torch._int_mm on CUDA" in why


def test_emulated_cuda_convolutions_and_batchnorm_fusion_match_the_cpu_torch_op_path(monkeypatch):
    """The bf16 convolutions and the fused conv-BN-add-ReLU run on CUDA with the torch-op code that the CPU
    tests check (tests/native/test_bf16_conv.py, test_fuse_native_bn.py): the same results, bit for bit."""
    from test_fuse_native_bn import Block

    opts = OPTS.replace(min_intensity=1e9)  # the linear head simulated on both routes
    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 4, 10, 10)
    plan = fracpass.Plan.static(8, 8, 8, rules=[fracpass.Rule(weight_scale="tensor")])
    with monkeypatch.context() as m:
        _emulate(m)
        nat = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=opts)
        cuda_route = _run(nat, (x,))
        assert {p for p, _ in native.op_paths(nat).values()} == {"bf16", "simulated"}
    monkeypatch.setattr(native.units, "ext", lambda t=None: None)  # the CPU route on torch ops
    # ... on bf16 products whatever this CPU's units (aten's bf16 convolution runs on any CPU): the comparison
    # is of the code, which the CPU otherwise leaves simulated without AVX512-BF16 or AMX-BF16
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: frozenset({"avx512_bf16", "avx512_vnni"}))
    nat_cpu = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=opts)
    cpu_route = _run(nat_cpu, (x,))
    assert len(cuda_route) == len(cpu_route)
    for i, (a, b) in enumerate(zip(cuda_route, cpu_route)):
        assert torch.equal(a, b), i


@pytest.mark.parametrize("bits", [3, 8])
def test_emulated_cuda_conv_matches_the_simulation(bits, emulated_cuda):
    torch.manual_seed(0)
    model, x = Conv(nn.Conv2d(6, 8, 3, padding=1)), torch.rand(3, 6, 9, 9) * 3 - 0.5
    sim, nat = _pair(model, fracpass.Plan.static(bits, bits, bits), (x,))
    want, got = _run(sim, (x,)), _run(nat, (x,))
    assert native.op_paths(nat)["conv"][0] == "bf16"
    _assert_within_bf16(got, want, f"emulated CUDA conv at {bits} bits", model, (x,), bits, folded=True)


# -- a real GPU --------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@needs_gpu
@pytest.mark.parametrize("bits", [3, 8])
def test_on_a_gpu_linear_matches_the_simulation(bits):
    torch.manual_seed(0)
    x = torch.rand(64, 64, device="cuda") * 3 - 1
    plan = fracpass.Plan.static(w=bits, a=bits, g=bits, rules=[fracpass.Rule(weight_scale="tensor")])
    model = Lin(64, 64).cuda()
    sim = fracpass.transform(model, plan, example_inputs=(x,))
    nat = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=OPTS)
    want, got = _run(sim, (x,)), _run(nat, (x,))
    assert native.op_paths(nat)["fc"][0] == "int8"
    _assert_close(got, want, f"CUDA linear at {bits} bits")


@needs_gpu
def test_on_a_gpu_fp8_products_match_the_simulation():
    if native.units.fp8_support(CUDA) is not None:
        pytest.skip(native.units.fp8_support(CUDA))
    torch.manual_seed(0)
    x = torch.rand(64, 64, device="cuda") * 3 - 1
    plan = fracpass.Plan.static(w=4, a=4, g=5, rules=[fracpass.Rule(weight_scale="tensor")])
    model = Lin(64, 64).cuda()
    sim = fracpass.transform(model, plan, example_inputs=(x,))
    nat = fracpass.transform(model, plan, example_inputs=(x,), execution="native", native=OPTS)
    want, got = _run(sim, (x,)), _run(nat, (x,))
    assert native.product_paths(nat)["fc"] == ("fp8", "fp8", "fp8")
    _assert_close(got, want, "CUDA FP8 linear at 4/4/5 bits")


@needs_gpu
def test_on_a_gpu_transform_returns_a_cuda_model():
    model = Lin(64, 64).cuda()
    qmodel = fracpass.transform(model, fracpass.Plan.static(8, 8, 8), example_inputs=(torch.randn(32, 64).cuda(),))
    assert {t.device.type for t in (*qmodel.buffers(), *qmodel.parameters())} == {"cuda"}


@needs_gpu
def test_on_a_gpu_conv_runs_bf16_and_trains():
    from test_fuse_native_bn import Block

    torch.manual_seed(0)
    model, x = Block().cuda(), torch.randn(8, 8, 16, 16, device="cuda")
    nat = fracpass.transform(model, fracpass.Plan.static(8, 8, 8), example_inputs=(x,), execution="native", native=OPTS)
    sim = fracpass.transform(model, fracpass.Plan.static(8, 8, 8), example_inputs=(x,))
    want, got = _run(sim, (x,)), _run(nat, (x,))
    assert "bf16" in {p for p, _ in native.op_paths(nat).values()}
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) <= 2**-6 * float(w.abs().max()) + 1e-5
