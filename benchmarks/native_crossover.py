"""Where native execution starts to beat the simulation: a linear layer's (int8) or a convolution's
(bf16) forward + backward over sizes.

    python benchmarks/native_crossover.py [--rounds 7] [--threads 1]
    python benchmarks/native_crossover.py --conv [--rounds 15] [--threads 2]
    python benchmarks/native_crossover.py --bmm [--rounds 11] [--threads 2]

For each (M, K, N) -- M rows of K features into N outputs, at w/a/g 8/8/8 -- one run times
``execution="simulate"`` and ``execution="native"`` (with ``NativeOptions(min_intensity=0)``,
so the int8 path runs at every size), in interleaved rounds; the table gives the medians, their
ratio, and the product's intensity MKN / (MK + KN + MN), the multiply-adds per element of its
operands and output. ``NativeOptions.min_intensity``'s default is set from where the ratio crosses 1.

``--conv``: a 3x3 convolution (C -> C, padding 1, per-tensor weights, 8/8/8) at batch N and H x W,
in NCHW and channels_last, with ``NativeOptions(min_conv_macs=0)``; the table gives its
forward multiply-adds, from which ``NativeOptions.min_conv_macs``'s default is set.

``--bmm``: torch.bmm of two activations (B entries of M x K times K x N, 8/8/8; attention's shapes
among them) on bf16, with ``NativeOptions(min_bmm_intensity=0)``; the table gives the
intensity per batch entry, from which ``NativeOptions.min_bmm_intensity``'s default is set.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import fracpass  # noqa: E402
import fracpass.native  # noqa: E402

SIZES = [(m, k, k) for m in (32, 256, 2048) for k in (64, 256, 1024)] + [(4096, 512, 512), (4096, 512, 2048)]
# (N, C, H): 4.7M .. 302M multiply-adds, CIFAR ResNet and digits shapes among them
CONV_SIZES = [(32, 16, 8), (128, 16, 8), (32, 32, 16), (128, 32, 8), (128, 16, 16), (64, 64, 8), (64, 32, 16),
              (64, 16, 32), (128, 16, 32), (128, 32, 16), (128, 64, 8)]


def _time(runs, step, rounds):
    times = {e: [] for e in runs}
    for q in runs.values():
        step(q)
        step(q)
    for _ in range(rounds):
        for e, q in runs.items():
            start = time.perf_counter()
            step(q)
            times[e].append(time.perf_counter() - start)
    return [statistics.median(times[e]) for e in ("simulate", "native")]


def conv_table(rounds: int) -> None:
    every_size = fracpass.NativeOptions(min_conv_macs=0)
    plan = fracpass.Plan.static(8, 8, 8, rules=[fracpass.Rule(weight_scale="tensor")])
    print("| N x C x H x W | layout | forward MACs | simulate ms | native ms | native / simulate |")
    print("|---|---|---:|---:|---:|---:|")
    for n, c, h in CONV_SIZES:
        for layout in ("NCHW", "channels_last"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False))
            x = torch.randn(n, c, h, h)
            if layout == "channels_last":
                model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            runs = {e: fracpass.transform(model, plan, example_inputs=(x,), execution=e,
                                       native=every_size if e == "native" else None) for e in ("simulate", "native")}
            assert fracpass.native.op_paths(runs["native"])["_0"][0] == "bf16"

            def step(q):
                y = q(x)
                y.backward(torch.ones_like(y))

            sim, nat = _time(runs, step, rounds)
            macs = n * c * c * 9 * h * h
            print(f"| {n} x {c} x {h} x {h} | {layout} | {macs / 1e6:.1f}M | {sim * 1e3:.3f} | {nat * 1e3:.3f} | "
                  f"{nat / sim:.2f} |")


# (B, M, K, N): attention's q k^T (K = head dim) and P v (K = sequence) at 8 heads, and square products
BMM_SIZES = [(256, 128, 64, 128), (256, 128, 128, 64), (64, 64, 32, 64), (64, 64, 64, 32), (256, 32, 64, 32),
             (256, 64, 32, 64), (128, 64, 64, 64), (128, 96, 64, 96), (32, 128, 128, 128), (16, 256, 256, 256),
             (8, 512, 512, 512), (128, 16, 16, 16)]


class _Bmm(nn.Module):
    def forward(self, a, b):
        return torch.bmm(a, b)


def bmm_table(rounds: int) -> None:
    every_size = fracpass.NativeOptions(min_bmm_intensity=0.0)
    print("| B x (M x K x N) | intensity | simulate ms | native ms | native / simulate |")
    print("|---|---:|---:|---:|---:|")
    for b, m, k, n in BMM_SIZES:
        torch.manual_seed(0)
        x, w = torch.randn(b, m, k, requires_grad=True), torch.randn(b, k, n, requires_grad=True)
        runs = {e: fracpass.transform(_Bmm(), fracpass.Plan.static(8, 8, 8), example_inputs=(x, w), execution=e,
                                    native=every_size if e == "native" else None)
                for e in ("simulate", "native")}

        def step(q):
            q(x, w).sum().backward()

        step(runs["native"])
        assert fracpass.native.op_paths(runs["native"])["bmm"][0] == "bf16"
        sim, nat = _time(runs, step, rounds)
        intensity = m * k * n / (m * k + k * n + m * n)
        print(f"| {b} x ({m} x {k} x {n}) | {intensity:.0f} | {sim * 1e3:.3f} | {nat * 1e3:.3f} | {nat / sim:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--conv", action="store_true", help="convolutions on bf16 instead of linear layers on int8")
    parser.add_argument("--bmm", action="store_true", help="batched products of two activations on bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.bmm:
        print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds")
        return bmm_table(args.rounds)
    if args.conv:
        print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds")
        return conv_table(args.rounds)
    every_size = fracpass.NativeOptions(min_intensity=0.0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds")
    print("| M x K x N | intensity | simulate ms | native ms | native / simulate |")
    print("|---|---:|---:|---:|---:|")
    for m, k, n in SIZES:
        torch.manual_seed(0)
        x = torch.randn(m, k, requires_grad=True)
        model = nn.Sequential(nn.Linear(k, n))
        runs = {e: fracpass.transform(model, fracpass.Plan.static(8, 8, 8), example_inputs=(x,), execution=e,
                                    native=every_size if e == "native" else None)
                for e in ("simulate", "native")}
        assert fracpass.native.op_paths(runs["native"])["_0"][0] == "int8"
        sim, nat = _time(runs, lambda q: q(x).sum().backward(), args.rounds)
        intensity = m * k * n / (m * k + k * n + m * n)
        print(f"| {m} x {k} x {n} | {intensity:.0f} | {sim * 1e3:.3f} | {nat * 1e3:.3f} | {nat / sim:.2f} |")


if __name__ == "__main__":
    main()
