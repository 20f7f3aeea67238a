"""FracTrain's PFQ on real images: scikit-learn's 8x8 handwritten digits (shipped with the package).

    python examples/digits_pfq.py [--epochs 12] [--target bitfusion] [--seed 0] [--execution native [--int8-convs]]
                                  [--channels-last] [--weight-scale channel|tensor]

A small CNN is transformed with the 3/4/6/8-bit ladder (gradients 6/6/8/8), trained with SGD while
``fracpass.Scheduler`` advances the stage on a training-loss plateau, then evaluated on a held-out
split. It prints the stage switches, the test accuracy, and the run's BitOPs and latency on the
target against training the whole run at the last (static 8-bit) stage. ``--execution native`` runs
the quantized linear layer's products on int8 codes and the quantized convolutions on bfloat16 codes
(``fracpass.native``); ``--int8-convs`` puts the convolutions' forward on oneDNN's int8 convolution
instead (opt-in). ``--weight-scale tensor`` quantizes each weight with one scale instead of one per
output channel; native, with ``--channels-last``, the stride-1 convolution's three products then all
run on int8.
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


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x))) + x
        return self.fc(x.mean((2, 3)))


def load(seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def run(epochs: int = 12, batch_size: int = 32, target: str = "bitfusion", seed: int = 0, log=print,
        execution: str = "simulate", int8_convs: bool = False, channels_last: bool = False,
        weight_scale: str = "channel", native: "fracpass.NativeOptions | None" = None):
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = load(seed)
    steps_per_epoch = len(y_train) // batch_size
    plan = fracpass.Plan.progressive(
        fw=(3, 4, 6, 8), bw=(6, 6, 8, 8),
        # the stem keeps full precision (its input is the data); windows of a third of an epoch
        exclude=("conv1",),
        switch=fracpass.LossPlateau(threshold=0.1, decay=0.5, window=3, eval_every=steps_per_epoch // 3,
                                    scale_windows=3))
    if weight_scale != "channel":
        plan = dataclasses.replace(plan, rules=(fracpass.Rule(weight_scale=weight_scale),))
    if int8_convs:
        if execution != "native":
            raise ValueError("int8_convs=True needs execution='native'")
        # conv2d's forward on int8 instead of bf16 (opt-in)
        native = (native or fracpass.NativeOptions()).replace(kinds=fracpass.native.KINDS)
    qmodel = fracpass.transform(DigitsCNN(), plan, example_inputs=(x_train[:2],), execution=execution,
                                native=native if execution == "native" else None)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:  # native: the fused convolutions' BatchNorm then runs on fracpass's CPU kernels
        qmodel = qmodel.to(memory_format=layout)
        x_test = x_test.contiguous(memory_format=layout)
    sched = fracpass.Scheduler(qmodel)
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    steps_in_stage = [0] * plan.num_stages
    for epoch in range(epochs):
        order = torch.randperm(len(y_train))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(qmodel(x_train[idx].contiguous(memory_format=layout)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps_in_stage[sched.stage] += 1
            sched.step(loss)
        log(f"epoch {epoch + 1}: loss {loss.item():.3f}, {sched}")
    qmodel.eval()
    with torch.no_grad():
        accuracy = (qmodel(x_test).argmax(1) == y_test).float().mean().item()
    report = fracpass.cost(qmodel, example_inputs=(x_train[:batch_size],), target=target)
    totals = report.training(steps_per_stage=steps_in_stage, batch_size=batch_size)
    for iteration, old, new, reason in sched.history:
        log(f"switch at iteration {iteration}: stage {old} -> {new} ({reason})")
    log(f"test accuracy {accuracy:.4f} at stage {sched.stage} (w/a/g {plan.stages[sched.stage].w}/"
        f"{plan.stages[sched.stage].a}/{plan.stages[sched.stage].g}); steps per stage {steps_in_stage}")
    log(str(totals))
    return accuracy, sched, totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--target", default="bitfusion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--execution", choices=("simulate", "native"), default="simulate")
    parser.add_argument("--int8-convs", action="store_true",
                        help="with --execution native: the convolutions' forward on int8 instead of bf16")
    parser.add_argument("--channels-last", action="store_true", help="the model and its inputs in channels_last")
    parser.add_argument("--weight-scale", choices=("channel", "tensor"), default="channel",
                        help="one scale per weight's output channel (default) or per weight")
    args = parser.parse_args(argv)
    if args.int8_convs and args.execution != "native":
        parser.error("--int8-convs needs --execution native")
    run(args.epochs, target=args.target, seed=args.seed, execution=args.execution, int8_convs=args.int8_convs,
        channels_last=args.channels_last, weight_scale=args.weight_scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
