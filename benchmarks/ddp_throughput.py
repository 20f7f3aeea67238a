"""DistributedDataParallel throughput: FP32 against fracpass static 8/8/8, on 1 and 2 processes, in one run.

    python benchmarks/ddp_throughput.py [--model resnet20] [--batch 32] [--steps 5] [--reps 5] [--threads 1]

Two gloo processes on this machine (CPU), started once. Every round runs the four variants in
turn, rotating their order: each is ``--steps`` timed training steps (forward, backward with DDP's
gradient all-reduce, SGD) after one untimed step. "1 process" is DDP over a group holding rank 0
alone while rank 1 waits at a barrier; "2 processes" is DDP over both, each with a local batch of
``--batch``. Samples/s of a variant is the median over rounds; the time ratio fracpass/FP32 is taken
per round within each world size (the two run back to back) and its median reported. If the
quantizers' overhead does not grow with ranks, the two ratios agree.

Each rank uses ``--threads`` intra-op threads, so 2 processes use twice the cores of 1: their
samples/s measure scaling only on a machine with that many idle cores.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import socket
import statistics
import sys
import time
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fracpass  # noqa: E402
from fracpass import models  # noqa: E402

Variant = Tuple[int, str]  # (processes, "fp32" | "fracpass")
VARIANTS: List[Variant] = [(1, "fp32"), (1, "fracpass"), (2, "fp32"), (2, "fracpass")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(kind: str, model_name: str, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(models, model_name)()
    if kind == "fracpass":
        model = fracpass.transform(model, fracpass.Plan.static(8, 8, 8), example_inputs=(x[:2],))
    return model


def _steps(ddp: nn.Module, opt, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def _worker(rank: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        groups = {1: dist.new_group([0]), 2: dist.new_group([0, 1])}  # every rank creates every group
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        runs: Dict[Variant, Tuple[nn.Module, torch.optim.Optimizer]] = {}
        for world, kind in VARIANTS:
            if rank < world:
                ddp = nn.parallel.DistributedDataParallel(_build(kind, args.model, x), process_group=groups[world])
                runs[world, kind] = ddp, torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        times: Dict[Variant, List[float]] = {v: [] for v in VARIANTS}
        for rep in range(args.reps):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
            for variant in order:
                dist.barrier()
                if variant in runs:
                    ddp, opt = runs[variant]
                    _steps(ddp, opt, x, y, 1)  # untimed: the order change may leave caches cold
                    elapsed = torch.tensor(_steps(ddp, opt, x, y, args.steps))
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=groups[variant[0]])
                    times[variant].append(float(elapsed))
                dist.barrier()
        if rank == 0:
            results.update(times)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", help="a CIFAR model of fracpass.models")
    parser.add_argument("--batch", type=int, default=32, help="local batch per process")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--reps", type=int, default=5, help="rounds")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    args = parser.parse_args(argv)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), args, results), nprocs=2, join=True)
    rate = {v: world * args.batch * args.steps / statistics.median(results[v]) for v in VARIANTS
            for world in [v[0]]}
    print(f"{args.model}, local batch {args.batch}, {args.steps} steps x {args.reps} interleaved rounds, "
          f"{args.threads} thread(s) per process, gloo on CPU")
    print(f"{'processes':>9}  {'FP32 samples/s':>14}  {'fracpass 8/8/8 samples/s':>24}  "
          f"{'fracpass/FP32 time, per round: median (min-max)':>48}")
    for world in (1, 2):
        # paired within a round (the two ran back to back), so slow drift of the machine cancels
        ratios = [q / f for q, f in zip(results[world, "fracpass"], results[world, "fp32"])]
        print(f"{world:>9}  {rate[world, 'fp32']:>14.1f}  {rate[world, 'fracpass']:>24.1f}  "
              f"{statistics.median(ratios):>33.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    spread = {v: (min(results[v]), max(results[v])) for v in VARIANTS}
    print("per-round seconds (min-max): " + ", ".join(f"{w}p {k} {lo:.2f}-{hi:.2f}" for (w, k), (lo, hi) in
                                                       spread.items()))


if __name__ == "__main__":
    main()
