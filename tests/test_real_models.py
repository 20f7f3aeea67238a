"""Real torchvision / timm models (issue 13): capture, 32-bit exactness, coverage against the flop
counter, a train step, gates and export. Skipped where the libraries do not import (torchvision's
wheel for torch 2.13 is a CUDA build that does not load against the CPU torch here)."""
import copy

import pytest
import torch

import fracpass
from fracpass.costing import CPU_ATTENTION_FLOPS
from torch.utils.flop_counter import FlopCounterMode

try:
    import torchvision.models as tvm
except Exception:  # ImportError, or the CUDA build's RuntimeError registering torchvision::nms
    tvm = None
try:
    import timm
except Exception:
    timm = None

TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_0", "vit_b_16", "swin_t"]
TIMM = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "ghostnet_050", "edgenext_xx_small"]
PLAN = fracpass.Plan.static(w=4, a=4, g=8)


def _build(source, name):
    if source == "torchvision":
        if tvm is None:
            pytest.skip("torchvision does not import here")
        return getattr(tvm, name)(weights=None)
    if timm is None:
        pytest.skip("timm does not import here")
    return timm.create_model(name, pretrained=False)


CASES = [("torchvision", n) for n in TORCHVISION] + [("timm", n) for n in TIMM]


@pytest.mark.slow
@pytest.mark.parametrize("source, name", CASES, ids=[f"{s}:{n}" for s, n in CASES])
def test_real_model_trains_gates_exports_and_coverage_matches_the_flop_counter(source, name, tmp_path):
    torch.manual_seed(0)
    model = _build(source, name).train()
    x = torch.randn(2, 3, 224, 224)
    full = fracpass.transform(model, fracpass.Plan.static(w=32, a=32, g=32), example_inputs=(x,))
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    ref = reference(x)
    torch.manual_seed(1)
    assert torch.equal(full(x), ref)
    qmodel = fracpass.transform(model, PLAN, example_inputs=(x,))
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        model(x)
    report = fracpass.cost(qmodel)
    assert report.forward_macs.per_batch == pytest.approx(counter.get_total_flops() // 2, rel=0.01)
    cov = fracpass.coverage(qmodel)
    opaque = sum(op.forward_macs for op in report.ops if op.kind == "opaque")
    assert cov.fraction("act", "macs") <= 1 - opaque / report.forward_macs.per_batch + 1e-9
    out = qmodel(x)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all()
    fracpass.export_onnx(qmodel, tmp_path / f"{name}.onnx")
