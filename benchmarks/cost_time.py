"""Cost-analysis time and ResNet-74 figures: forward MACs per 32x32 image and FracTrain's relative
cost per stage of the CIFAR ladder (3/4/6/8 forward, 6/6/8/8 gradients).

    python benchmarks/cost_time.py
"""
from __future__ import annotations

import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import fracpass  # noqa: E402
from examples.models import CifarResNet  # noqa: E402


def main() -> int:
    plan = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8))
    x = torch.randn(1, 3, 32, 32)
    for depth in (74, 1202):
        qmodel = fracpass.transform(CifarResNet(depth), plan, example_inputs=(x,))
        fracpass.cost(qmodel, target="bitfusion")  # warm-up
        start = time.perf_counter()
        report = fracpass.cost(qmodel, target="bitfusion")
        elapsed = time.perf_counter() - start
        print(f"ResNet-{depth}: cost analysis {elapsed * 1e3:.0f} ms for {len(report.ops)} compute ops; "
              f"forward MACs per image {report.forward_macs.per_sample:,.0f}, "
              f"backward {report.backward_macs.per_sample:,.0f}")
        for k, s in enumerate(plan.stages):
            print(f"  stage {k} (w/a/g {s.w}/{s.a}/{s.g}): {100 * report.relative_to_fp32(k):.3f}% of FP32 BitOPs, "
                  f"bitfusion {report.latency_s(k) * 1e3:.3f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
