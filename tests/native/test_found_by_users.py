"""Bugs users found in native execution (issue 29), each reproduced on any CPU: the int8 and bf16 units are
claimed (``units._cpu_flags``), so the native paths run, emulated where this CPU lacks the instructions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native

UNITS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_int8", "amx_bf16"})
EVERY_SIZE = fracpass.NativeOptions(kinds=fracpass.native.DEFAULT_KINDS + ("conv_transpose",), min_conv_macs=0, min_intensity=0.0,
                                    min_bmm_intensity=0.0)


@pytest.fixture(autouse=True)
def units_claimed(monkeypatch):
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: UNITS)


class ConvNet(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv, self.bn, self.fc = conv, nn.BatchNorm2d(conv.out_channels), nn.LazyLinear(10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_coverage_and_cost_leave_the_last_call_records_alone():
    """summary reports each op's path at the user's last call: a coverage or cost run on the example
    batch, which takes other paths (here a batch-1 convolution under min_conv_macs), must not overwrite it."""
    model = ConvNet(nn.Conv2d(8, 16, 3, padding=1))
    x = torch.randn(16, 8, 12, 12)
    model(x)
    options = fracpass.NativeOptions(min_conv_macs=200_000)  # the batch of 16 is over it, one sample under it
    q = fracpass.transform(model, fracpass.Plan.static(8, 8, 8, exclude=("fc",)), example_inputs=(x[:1],),
                           execution="native", native=options)
    q(x).sum().backward()
    before = native.op_paths(q)
    assert before["conv"][0] == "bf16", before
    fracpass.coverage(q)
    fracpass.cost(q)
    assert native.op_paths(q) == before
    assert "bf16" in fracpass.summary(q)


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv1d(4, 6, 3, padding=1), (2, 4, 10)),
    (nn.Conv2d(4, 6, 3, padding=1), (2, 4, 6, 6)),
    (nn.Conv2d(4, 6, 3, padding=1).to(memory_format=torch.channels_last), (2, 4, 6, 6)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2), (2, 4, 5, 5)),
], ids=["conv1d", "conv2d", "conv2d channels_last", "conv_transpose2d"])
def test_a_nan_in_a_native_convolutions_input_gives_nan_as_the_simulation_does(conv, shape):
    """A non-finite batch must come out NaN (the README's recipe skips the step on a NaN loss), not raise
    'encode_bf16: bytes q - lo need one range ...'; the next finite batch runs native again."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    if conv.weight.is_contiguous(memory_format=torch.channels_last) and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    q = fracpass.transform(nn.Sequential(conv), fracpass.Plan.static(8, 8, 8), example_inputs=(x,),
                           execution="native", native=EVERY_SIZE)
    bad = x.clone()
    bad[(0,) * bad.dim()] = float("nan")
    out = q(bad)
    assert torch.isnan(out).any()
    out.sum().backward()
    counted = [int(m.nonfinite_batches) for m in q.modules() if hasattr(m, "nonfinite_batches")]
    assert counted == [1], counted  # the batch counted as non-finite, once, by the input's quantizer
    good = q(x)
    assert torch.isfinite(good).all()
    assert {path for path, _ in native.op_paths(q).values()} == {"bf16"}


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x)


class Attention(nn.Module):
    """A batched product of two activations (q k^T): native_matmul's bf16 path."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return torch.matmul(self.q(x), self.k(x).transpose(-2, -1))


@pytest.mark.parametrize("make, shape", [(Linear, (4, 16)), (Attention, (2, 6, 16))], ids=["linear", "matmul"])
def test_a_nan_in_a_native_products_input_gives_nan(make, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    q = fracpass.transform(make(), fracpass.Plan.static(8, 8, 8), example_inputs=(x,), execution="native",
                           native=EVERY_SIZE)
    assert any(path != "simulated" for path, _ in native.op_paths(q).values()), native.op_paths(q)
    bad = x.clone()
    bad[(0,) * bad.dim()] = float("nan")
    out = q(bad)
    assert torch.isnan(out).any()
    out.sum().backward()
    assert torch.isfinite(q(x)).all()


class UpNet(nn.Module):
    """A decoder step as a U-Net writes it: a ConvTranspose2d upsampling, then a 3x3 convolution."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.up(x)))


def test_a_transposed_convolution_stays_simulated_by_default_and_says_why():
    """ConvTranspose2d's native backward measured 1.5-2.4x the simulation's time on a CPU with bf16 units
    (issue 29): by default it stays simulated, and summary says why and how to opt in; with the
    "conv_transpose" kind it runs on bf16 again, as close to the simulation as before."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 12, 12)
    plan = fracpass.Plan.static(8, 8, 8)
    default = fracpass.transform(UpNet(), plan, example_inputs=(x,), execution="native",
                                 native=fracpass.NativeOptions(min_conv_macs=0))
    default(x).sum().backward()
    paths = native.op_paths(default)
    assert paths["up"] == ("simulated", native.options.CONV_TRANSPOSE_SIMULATED)
    assert paths["conv"][0] == "bf16"
    assert "add 'conv_transpose' to NativeOptions.kinds" in fracpass.summary(default)
    assert not default.graph.find_nodes(op="call_function", target=native.calls.bf16_conv_transpose2d)
    opted = fracpass.transform(UpNet(), plan, example_inputs=(x,), execution="native",
                               native=fracpass.NativeOptions(min_conv_macs=0, kinds=native.DEFAULT_KINDS + ("conv_transpose",)))
    opted.load_state_dict(default.state_dict())
    torch.manual_seed(1)
    got = opted(x)
    assert native.op_paths(opted)["up"][0] == "bf16"
    torch.manual_seed(1)
    want = default(x)
    got, want = got.detach(), want.detach()
    assert torch.allclose(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))


def test_cost_and_coverage_read_a_graph_whose_fused_calls_hand_on_their_range():
    """A fused conv-BatchNorm call wired to the convolutions after it returns (out, Handover): cost analysis
    (what `fracpass bench` runs) and coverage read its output, and count what the simulated model counts.
    (CI found `fracpass bench` failing with "'tuple' object has no attribute 'shape'".)"""
    import fracpass.models

    x = torch.randn(4, 3, 32, 32)
    model = fracpass.models.resnet20()
    plan = fracpass.Plan.static(8, 8, 8)
    wired = fracpass.transform(model, plan, example_inputs=(x,), execution="native",
                               native=fracpass.NativeOptions(min_conv_macs=0))
    assert len([n for n in wired.graph.nodes if n.name.endswith("_handover")]) == 18
    simulated = fracpass.transform(model, plan, example_inputs=(x,))
    got, want = fracpass.cost(wired), fracpass.cost(simulated)
    assert got.ops == want.ops and got.bitops() == want.bitops() and not got.not_costed
    covered = fracpass.coverage(wired)
    assert covered.ops == fracpass.coverage(simulated).ops and covered.paths["layer1_0_conv2"][0] == "bf16"


def test_a_native_model_exports_to_onnx_as_its_simulation_computes(tmp_path):
    """A model trained with execution="native" exports what its simulation computes (Q/DQ around float
    ops). Its own int8 and bf16 products round differently, within their bounds; export compared
    onnxruntime with them and refused every native model on a CPU with the units ("the first layer that
    differs is fc_aq: 0.36 of its codes ...")."""
    pytest.importorskip("onnxruntime")
    import fracpass.models

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    q = fracpass.transform(fracpass.models.resnet20(), fracpass.Plan.static(8, 8, 8), example_inputs=(x[:2],),
                           execution="native", native=fracpass.NativeOptions(min_conv_macs=0))
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(q(x), torch.arange(8) % 10).backward()
        opt.step()
    assert native.op_paths(q)["layer1_0_conv1"][0] == "bf16"
    fracpass.export_onnx(q, tmp_path / "native.onnx", (x,))
    assert (tmp_path / "native.onnx").exists()
    assert q.training and fracpass.native.op_paths(q)["layer1_0_conv1"][0] == "bf16"  # the model itself is as it was


def test_configuring_an_eval_model_leaves_every_module_in_eval():
    """fracpass.native.configure with other kinds captures the graph again: the quantizers it makes must be
    in the model's mode (an eval model's came back training, so their ranges moved on an eval batch)."""
    x = torch.randn(4, 8, 12, 12)
    q = fracpass.transform(ConvNet(nn.Conv2d(8, 16, 3, padding=1)), fracpass.Plan.static(8, 8, 8),
                           example_inputs=(x,), execution="native")
    q(x)
    q.eval()
    fracpass.native.configure(q, fracpass.NativeOptions(kinds=("linear",)))
    assert [n for n, m in q.named_modules() if m.training] == []
    before = {n: b.clone() for n, b in q.named_buffers()}
    with torch.no_grad():
        q(x * 3)
    assert all(torch.equal(before[n], b) for n, b in q.named_buffers())
