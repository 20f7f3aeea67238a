"""The native kernels as torch ops (csrc/native_module.cpp; fakes in fracpass.kernel_ops.NATIVE_FAKES).

Each op passes torch.library.opcheck (its schema and mutation annotations, its fake implementation,
autograd registration, AOT dispatch) on arguments native execution gave it: recorded from training steps
of a native ResNet-20 (bf16 convolutions with their int8 products, the fused BatchNorm) and of int8
linear layers, with the units claimed, so that the paths run on any CPU (emulated where it lacks the
instructions). The native code reaches the kernels only through the ops (``units.ext()``).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fracpass
import fracpass.models
from fracpass import kernel_ops, native

UNITS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_int8", "amx_bf16"})


def _kept(value):
    """A copy of a kernel's argument as it was passed (tensors cloned with their strides)."""
    if isinstance(value, torch.Tensor):
        return value.clone()  # its strides kept where it is dense (preserve_format)
    return list(value) if isinstance(value, tuple) else value


@pytest.fixture(scope="module")
def recorded():
    """kernel name -> the arguments of its first call in the workloads."""
    ext = native.units.ext()
    if ext is None:
        pytest.skip("the native kernels could not be built here")
    calls = {}

    def recorder(name, op):
        def call(*args):
            calls.setdefault(name, tuple(_kept(a) for a in args))
            return op(*args)
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native.units, "_cpu_flags", lambda: UNITS)
        for name in kernel_ops.NATIVE_FAKES:
            mp.setattr(ext, name, recorder(name, getattr(ext, name)), raising=False)
        # ResNet-20 channels-last: the fused BatchNorm on the kernels, the int8 products of its convolutions
        _resnet_step(fracpass.NativeOptions(min_conv_macs=0), torch.channels_last)
        # weight codes beyond int8 shifted rather than split; NCHW with aten's BatchNorm and the ReLU's bits
        _resnet_step(fracpass.NativeOptions(min_conv_macs=0, split_channels=0.0), torch.channels_last)
        _resnet_step(fracpass.NativeOptions(min_conv_macs=0, channels_last=False), torch.contiguous_format)
        # gated (FracTrain): per-sample scales, codes narrowed to bytes by their own pass
        _resnet_step(fracpass.NativeOptions(min_conv_macs=0), torch.channels_last, plan=fracpass.Plan.fractrain("cifar"))
        # conv2d's forward on oneDNN's int8 convolution (the opt-in kind; per-channel weights)
        _resnet_step(fracpass.NativeOptions(min_conv_macs=0, kinds=native.KINDS), torch.channels_last,
                     plan=fracpass.Plan.static(8, 8, 8))
        _linear_step("tensor")
        _linear_step("channel")
    return calls


def _resnet_step(options, layout, plan=None):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=layout)
    if plan is None:
        plan = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8))
        plan = dataclasses.replace(plan, rules=(fracpass.Rule(weight_scale="tensor"),))
    q = fracpass.transform(fracpass.models.resnet20().train(), plan, example_inputs=(x[:2],), execution="native",
                           native=options).to(memory_format=layout)
    fracpass.set_stage(q, -1)  # the last stage: 8-bit codes
    nn.functional.cross_entropy(q(x), torch.arange(8) % 10).backward()


def _linear_step(weight_scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    x = torch.randn(48, 64)
    plan = dataclasses.replace(fracpass.Plan.static(8, 8, 8), rules=(fracpass.Rule(weight_scale=weight_scale),))
    q = fracpass.transform(model, plan, example_inputs=(x,), execution="native",
                           native=fracpass.NativeOptions(min_intensity=0.0))
    q(x).square().mean().backward()


# kernels the workloads do not reach here, and why
UNREACHED = {
    "weight_grad_u8": "built only with AVX512-VNNI",
}


@pytest.mark.parametrize("name", sorted(kernel_ops.NATIVE_FAKES))
def test_opcheck(name, recorded):
    if name not in recorded:
        if name == "weight_grad_u8" and not native.units.ext().vnni_weight_grad():
            pytest.skip(UNREACHED[name])
        pytest.fail(f"no workload called {name}: add one that does")
    torch.library.opcheck(getattr(torch.ops.fracpass, name).default, recorded[name])


def test_every_native_kernel_is_an_op_with_a_fake_and_the_module_binds_no_kernel(recorded):
    module = native.units.ext()._module
    bound = sorted(n for n in dir(module) if not n.startswith("_"))
    assert bound == ["vnni_weight_grad"]  # the build's capability query, not a kernel
    mutated = {name: [a.name for a in getattr(torch.ops.fracpass, name).default._schema.arguments if a.is_write]
               for name in kernel_ops.NATIVE_FAKES}
    assert {k: v for k, v in mutated.items() if v} == {
        "relu_bits_": ["out"], "bn_forward_bf16": ["running_mean", "running_var"], "epilogue": ["acc"]}
    assert set(recorded) | set(UNREACHED) == set(kernel_ops.NATIVE_FAKES)


def test_the_relu_ops_trace_into_a_compiled_graph():
    """Dynamo traces a native kernel op through its fake: relu_bits_ and relu_grad_bits in one graph."""
    if native.units.ext() is None:
        pytest.skip("the native kernels could not be built here")

    def step(x, g):
        bits = torch.ops.fracpass.relu_bits_(x)
        return torch.ops.fracpass.relu_grad_bits(g, bits)

    x = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    explained = torch._dynamo.explain(step)(x.clone(), g)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(x.clone(), g)
    assert torch.equal(got, step(x.clone(), g))
