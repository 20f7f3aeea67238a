"""Native execution chooses its own layout (issue 29): a user's NCHW model runs its 2-D convolutions on the
paths of the channels-last model, with outputs and gradients given back NCHW. On any CPU: the units are
claimed (``units._cpu_flags``), so the native paths run, emulated where this CPU lacks the instructions."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fracpass
from fracpass import native

UNITS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_int8", "amx_bf16"})
EVERY_SIZE = fracpass.NativeOptions(min_conv_macs=0, min_intensity=0.0, min_bmm_intensity=0.0)
TENSOR = [fracpass.Rule(weight_scale="tensor")]


@pytest.fixture(autouse=True)
def units_claimed(monkeypatch):
    monkeypatch.setattr(native.units, "_cpu_flags", lambda: UNITS)


class Block(nn.Module):
    """A stem, a residual block (conv-BN-ReLU, conv-BN, + the stem's output, ReLU) and a 1x1 head: a 4-D output."""

    def __init__(self, c=16):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.head(y)


def _step(qmodel, x, seed=5):
    """Output, input gradient and parameter gradients of <y, r> for a fixed r, the gradient noise seeded."""
    qmodel.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = qmodel(x)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(seed)
    (y * r).sum().backward()
    return y.detach(), x.grad, [p.grad for p in qmodel.parameters()]


def _native(model, x, options=EVERY_SIZE, plan=None):
    plan = plan or fracpass.Plan.static(8, 8, 8, rules=TENSOR)
    return fracpass.transform(copy.deepcopy(model), plan, example_inputs=(x,), execution="native", native=options)


def test_an_nchw_model_runs_on_the_channels_last_models_paths_and_gives_nchw_back():
    torch.manual_seed(0)
    model, x = Block(), torch.rand(4, 3, 12, 12) * 2 - 0.5
    x_cl = x.contiguous(memory_format=torch.channels_last)
    users, tuned = _native(model, x), _native(model.to(memory_format=torch.channels_last), x_cl)
    y, dx, grads = _step(users, x)
    y_cl, dx_cl, grads_cl = _step(tuned, x_cl)
    assert native.product_paths(users) == native.product_paths(tuned)
    # the paths that take channels_last only: oneDNN's int8 forward and the fused BatchNorm kernels
    assert any("int8" in runs for runs in native.product_paths(users).values())
    paths = native.op_paths(users)
    assert "its NCHW input converted to channels_last at the last call" in paths["stem"][1], paths["stem"]
    assert "converted" not in paths["conv1"][1] and "converted" not in paths["conv2"][1]  # already channels_last
    # the same values as the channels-last model (same layout inside, so the same rounding noise), given back NCHW
    assert torch.equal(y, y_cl) and torch.equal(dx, dx_cl)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_cl))
    assert y.is_contiguous() and dx.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    assert all(p.grad.is_contiguous() for p in users.parameters() if p.grad is not None)


def test_the_option_off_keeps_the_models_layout_and_its_slower_paths():
    """What NCHW models ran before (main): not the int8 forward, not the fused BatchNorm kernels."""
    torch.manual_seed(0)
    model, x = Block(), torch.rand(4, 3, 12, 12)
    kept = _native(model, x, EVERY_SIZE.replace(channels_last=False))
    y, dx, _ = _step(kept, x)
    paths = native.op_paths(kept)
    assert "oneDNN's int8 convolution runs channels_last" in str(paths) or "an NCHW product" in str(paths), paths
    assert native.product_paths(kept) != native.product_paths(_native(model, x)) or not any(
        "int8" in runs for runs in native.product_paths(kept).values())
    assert y.is_contiguous() and dx.is_contiguous()
    assert "like_input" not in kept.code


def test_an_nchw_model_equals_the_simulation_within_bfloat16_rounding():
    torch.manual_seed(0)
    model, x = Block(), torch.rand(4, 3, 12, 12) * 2 - 0.5
    plan = fracpass.Plan.static(8, 8, 8, rules=TENSOR)
    sim = fracpass.transform(copy.deepcopy(model), plan, example_inputs=(x,))
    y_sim = _step(sim, x)[0]
    y = _step(_native(model, x), x)[0]
    # four convolutions, each output rounded to bfloat16 once (u = 2^-8) and then re-quantized at 8 bits
    err, span = float((y - y_sim).abs().max()), float(y_sim.abs().max())
    assert err <= 4 * 2.0**-8 * span + 4 * span / 255, f"{err:.3g} of {span:.3g}"
    assert y.is_contiguous() and y_sim.is_contiguous()


def test_the_graph_gives_its_outputs_back_in_the_inputs_layout_once():
    torch.manual_seed(0)
    model, x = Block(), torch.rand(2, 3, 8, 8)
    q = _native(model, x)
    assert q.code.count("fracpass_native_layout_like_input(") == 1
    q.eval(), q.train()  # a re-capture lowers again: still one
    assert q.code.count("fracpass_native_layout_like_input(") == 1
    assert q(x).is_contiguous()
    assert q(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
