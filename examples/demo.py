"""Demo: transform a built-in CIFAR ResNet-20 with FracTrain's progressive plan and train a few steps.

    python examples/demo.py [--steps-per-stage 3] [--batch-size 32]

It trains on synthetic 32x32 images (no downloads), walks the PFQ ladder 3/4/6/8 bits (gradients
6/6/8/8) with ``fracpass.set_stage``, and prints the loss per step and the summary table. Then it
trains the same network with FracTrain's full method (``Plan.fractrain("cifar")``: per-sample,
per-block gates plus the staged cost target) and prints the gates' choices and their costs.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fracpass  # noqa: E402
from examples.models import resnet20  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps-per-stage", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--plan", default=str(ROOT / "examples" / "plans" / "fractrain_cifar.toml"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = resnet20()
    plan = fracpass.Plan.load(args.plan)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    start = time.perf_counter()
    qmodel = fracpass.transform(model, plan, example_inputs=(x[:1],))
    print(f"transformed ResNet-20 in {1e3 * (time.perf_counter() - start):.0f} ms")

    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    for stage in range(plan.num_stages):
        fracpass.set_stage(qmodel, stage)
        for step in range(args.steps_per_stage):
            loss = F.cross_entropy(qmodel(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            s = plan.stages[stage]
            print(f"stage {stage} (w/a/g = {s.w}/{s.a}/{s.g}) step {step}: loss {loss.item():.4f}")
    qmodel.eval()
    with torch.no_grad():
        acc = (qmodel(x).argmax(1) == y).float().mean().item()
    print(f"eval accuracy on the (memorised) synthetic batch: {acc:.2f}")
    print(fracpass.summary(qmodel))

    print("\nFracTrain, full method: DFQ gates per residual block and sample, cost target per stage")
    qmodel = fracpass.transform(resnet20(), fracpass.Plan.fractrain("cifar"), example_inputs=(x[:2],))
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    for step in range(args.steps_per_stage * 2):
        loss = F.cross_entropy(qmodel(x), y)
        total = loss + fracpass.gate_loss(qmodel)
        opt.zero_grad()
        total.backward()
        opt.step()
        stats = fracpass.gate_stats(qmodel)
        print(f"step {step}: loss {loss.item():.4f}, gates' mean cost {stats.mean_cost:.3f}% of FP32 "
              f"(target {stats.target:g}%)")
    print(fracpass.gate_stats(qmodel))
    print(fracpass.cost(qmodel).gates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
