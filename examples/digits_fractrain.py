"""FracTrain's full method (PFQ + DFQ) on real images: scikit-learn's 8x8 handwritten digits.

    python examples/digits_fractrain.py [--epochs 15] [--no-baseline] [--seed 0] [--execution native]

A small residual CNN (a stem and three residual blocks) is transformed with
``fracpass.Plan.fractrain("cifar")``: per block and per sample a gate picks one of five
(activation, gradient) options (3/6, 4/6, 4/8, 6/8, 6/12 bits, weights at 4), trained toward a
relative-cost target that the loss-plateau indicator steps up 1.5 -> 2 -> 2.5 -> 3 % of FP32 as
the stages advance. It prints, per epoch, the mean cost the gates chose against the target in
force; then the stage switches, the held-out accuracy, the gates' option mix, and the run's
training BitOPs against the same network trained at static 8/8/8 (which it also trains and
evaluates, unless --no-baseline). ``--execution native`` runs the gated convolutions per sample on
bfloat16 codes (fracpass.native).
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import fracpass  # noqa: E402
from examples.digits_pfq import load  # noqa: E402


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class DigitsResNet(nn.Module):
    def __init__(self, c: int = 16, blocks: int = 3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.blocks(F.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


def train(plan: fracpass.Plan, epochs: int, batch_size: int, seed: int, log, label: str, execution: str = "simulate",
          native: "fracpass.NativeOptions | None" = None):
    """Train DigitsResNet under ``plan``; returns (accuracy, scheduler, BitOPs of the run, model, bookkeeping):
    bookkeeping holds the FP32 BitOPs per sample, the samples trained on and the static relative cost."""
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = load(seed)
    steps_per_epoch = len(y_train) // batch_size
    qmodel = fracpass.transform(DigitsResNet(), plan, example_inputs=(x_train[:batch_size],), execution=execution,
                                native=native if execution == "native" else None)
    sched = fracpass.Scheduler(qmodel)
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    # BitOPs per sample at 32 x 32 bits: the run's cost is sum over steps of (relative cost x this x batch)
    fp32 = fracpass.cost(qmodel).fp32_bitops()["total"]
    static_relative = fracpass.cost(qmodel).relative_to_fp32() if plan.gates is None else None
    bitops, samples = 0.0, 0
    for epoch in range(epochs):
        order = torch.randperm(len(y_train))
        costs = []
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(qmodel(x_train[idx]), y_train[idx])
            total = loss + sched.gate_loss()
            if plan.gates is not None:
                stats = fracpass.gate_stats(qmodel)
                costs.append(stats.mean_cost)
                bitops += stats.mean_cost / 100 * fp32 * len(idx)
            else:
                bitops += static_relative * fp32 * len(idx)
            samples += len(idx)
            opt.zero_grad()
            total.backward()
            opt.step()
            sched.step(loss)
        line = f"{label} epoch {epoch + 1}: loss {loss.item():.3f}, stage {sched.stage}"
        if costs:
            line += f", gates' mean cost {sum(costs) / len(costs):.3f}% of FP32 (target {qmodel.gates.target:g}%)"
        log(line)
    qmodel.eval()
    with torch.no_grad():
        accuracy = (qmodel(x_test).argmax(1) == y_test).float().mean().item()
    bookkeeping = {"fp32_bitops_per_sample": fp32, "samples": samples, "relative_cost": static_relative}
    return accuracy, sched, bitops, qmodel, bookkeeping


def run(epochs: int = 15, batch_size: int = 32, seed: int = 0, baseline: bool = True, log=print,
        execution: str = "simulate", native: "fracpass.NativeOptions | None" = None):
    plan = fracpass.Plan.fractrain("cifar")
    steps_per_epoch = len(load(seed)[0][1]) // batch_size
    # the preset's windows are sized for CIFAR (390 steps); these epochs have 44
    plan = dataclasses.replace(plan, switch=dataclasses.replace(plan.switch, eval_every=steps_per_epoch // 2,
                                                                window=3, scale_windows=3))
    accuracy, sched, bitops, qmodel, _ = train(plan, epochs, batch_size, seed, log, "fractrain", execution, native)
    for iteration, old, new, reason in sched.history:
        log(f"switch at iteration {iteration}: stage {old} -> {new} ({reason})")
    log(str(fracpass.gate_stats(qmodel)))
    log(f"FracTrain: test accuracy {accuracy:.4f}, training BitOPs {bitops:.3e}")
    result = {"accuracy": accuracy, "bitops": bitops, "switches": [h[0] for h in sched.history]}
    if baseline:
        static_acc, _, static_bitops, _, static_books = train(fracpass.Plan.static(8, 8, 8), epochs, batch_size, seed, log,
                                                              "static", execution, native)
        log(f"static 8/8/8: test accuracy {static_acc:.4f}, training BitOPs {static_bitops:.3e}; FracTrain used "
            f"{100 * (1 - bitops / static_bitops):.1f}% fewer BitOPs, accuracy {100 * (accuracy - static_acc):+.2f} points")
        result.update(static_accuracy=static_acc, static_bitops=static_bitops, static_bookkeeping=static_books)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--no-baseline", action="store_true", help="skip the static 8/8/8 comparison run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--execution", choices=("simulate", "native"), default="simulate",
                        help="native: gated and static convolutions on bfloat16 codes, the linear on int8 "
                             "(fracpass.transform's execution)")
    args = parser.parse_args(argv)
    run(args.epochs, seed=args.seed, baseline=not args.no_baseline, execution=args.execution)
    return 0


if __name__ == "__main__":
    sys.exit(main())
