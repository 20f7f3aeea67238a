"""Where native int8 starts to beat the simulation: a linear layer's forward + backward over sizes.

    python benchmarks/native_crossover.py [--rounds 7] [--threads 1]

For each (M, K, N) -- M rows of K features into N outputs, at w/a/g 8/8/8 -- one run times
``execution="simulate"`` and ``execution="native"`` (with ``fracpass.native.MIN_INTENSITY`` set to 0,
so the int8 path runs at every size), in interleaved rounds; the table gives the medians, their
ratio, and the product's intensity MKN / (MK + KN + MN), the multiply-adds per element of its
operands and output. ``MIN_INTENSITY`` (fracpass/native.py) is set from where the ratio crosses 1.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fracpass.native.MIN_INTENSITY = 0.0
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds")
    print("| M x K x N | intensity | simulate ms | native ms | native / simulate |")
    print("|---|---:|---:|---:|---:|")
    for m, k, n in SIZES:
        torch.manual_seed(0)
        x = torch.randn(m, k, requires_grad=True)
        model = nn.Sequential(nn.Linear(k, n))
        runs = {e: fracpass.transform(model, fracpass.Plan.static(8, 8, 8), example_inputs=(x,), execution=e)
                for e in ("simulate", "native")}
        assert fracpass.native.op_paths(runs["native"])["_0"][0] == "int8"
        times = {e: [] for e in runs}
        for q in runs.values():
            q(x).sum().backward()
        for _ in range(args.rounds):
            for e, q in runs.items():
                start = time.perf_counter()
                q(x).sum().backward()
                times[e].append(time.perf_counter() - start)
        sim, nat = (statistics.median(times[e]) for e in ("simulate", "native"))
        intensity = m * k * n / (m * k + k * n + m * n)
        print(f"| {m} x {k} x {n} | {intensity:.0f} | {sim * 1e3:.3f} | {nat * 1e3:.3f} | {nat / sim:.2f} |")


if __name__ == "__main__":
    main()
