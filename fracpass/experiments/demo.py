"""``fracpass demo``: FP32, static 8/8/8 and FracTrain on scikit-learn's digits, side by side.

A CIFAR-style ResNet-8 adapted to 1-channel 8x8 images trains three times with one seed: without
quantizers, at static 8/8/8 (FracTrain's 8-bit baseline), and with FracTrain's full method
(``Plan.fractrain``: per-block gates over five (activation, gradient) options, their cost target
stepped by the loss-plateau rule). It prints the comparison table — accuracy, training BitOPs,
relative cost, saving vs static 8/8/8, energy and latency on the Bit Fusion profile — and writes
``results.json``, ``results.md`` and the plots. One seed says little: ``examples/fractrain_mnist.py``
runs every recipe over several seeds and both data sets.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="fracpass-demo", help="folder for results.json, results.md and the plots "
                                                          "(default ./fracpass-demo)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    p.add_argument("--quick", action="store_true", help="a seventh of the iterations (a smoke test, ~20 s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per run instead)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: these small convolutions gain "
                                                          "little from more, and lose much on a busy machine)")


def run(args, out=print) -> int:
    import torch

    from fracpass.experiments.compare import console_table, gates_table, run_comparison, write_results
    from fracpass.experiments.data import load_digits
    from fracpass.experiments.recipes import DEMO_RECIPES, config_for

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = load_digits()
    cfg = config_for("digits", quick=args.quick)
    out(f"fracpass demo: {data.describe()}")
    out(f"training FP32, static 8/8/8 and FracTrain: ResNet-{6 * cfg.blocks + 2}, {cfg.iterations} iterations of "
        f"batch {cfg.batch_size}, seed {args.seed}, {torch.get_num_threads()} thread(s)")
    results = run_comparison(data, cfg, [args.seed], DEMO_RECIPES, progress=not args.no_progress, out=out)
    out("")
    out(console_table(results["summary"]))
    out("")
    out("BitOPs (paper): quantized compute ops only, as FracTrain counts; whole model: the full-precision stem and "
        "classifier at 32 bits and the gates included. Energy and latency: whole training run on Bit Fusion.")
    out(gates_table(results["summary"]).replace("**", ""))
    command = "fracpass demo" + (" --quick" if args.quick else "")
    paths = write_results(results, Path(args.out), command)
    out(f"wrote {', '.join(str(p) for p in paths.values())}")
    out(f"done in {time.perf_counter() - start:.0f} s. One seed on an easy set says little: "
        "python examples/fractrain_mnist.py runs every recipe over 5 seeds on digits and MNIST-5k.")
    return 0
