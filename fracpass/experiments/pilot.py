"""Pilot timing for the long runs: a few training iterations per variant, to estimate their wall time.

    python -m fracpass.experiments.pilot [--dataset fashion-mnist] [--iterations 100] [--budget-s 50]
                                         [--variants fp32,static-8/8/8,static-8/8/8:native] [--threads 1]

Each variant (``recipe`` or ``recipe:native``) is built as a comparison builds it and trains on the
data set's batches with its optimiser, for ``--iterations`` timed iterations after two untimed ones,
or until ``--budget-s`` seconds have passed; one evaluation pass over 1,000 images is timed too.
It prints seconds per iteration and per evaluated image, and a JSON line with the same numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

__all__ = ["time_variant", "main"]


def time_variant(recipe: str, cfg, data, iterations: int, budget_s: float, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    import fracpass
    from fracpass.experiments.runner import build, evaluate

    start = time.perf_counter()
    model, plan, _ = build(recipe, cfg, data, seed)
    build_s = time.perf_counter() - start
    sched = fracpass.Scheduler(model) if plan is not None else None
    gated = plan is not None and plan.gates is not None
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    b, times = cfg.batch_size, []
    model.train()
    for it in range(iterations + 2):
        idx = order[(it * b) % (len(order) - b):][:b]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        total = loss + fracpass.gate_loss(model) if gated else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if sched is not None:
            sched.step(loss.detach())
        loss.item()
        if it >= 2:
            times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    t0 = time.perf_counter()
    evaluate(model, data.x_test[:1000], data.y_test[:1000])
    eval_per_image = (time.perf_counter() - t0) / 1000
    return {"variant": recipe + (":native" if cfg.execution == "native" else ""), "iterations": len(times),
            "s_per_iteration": sum(times) / max(1, len(times)), "build_s": build_s, "eval_s_per_image": eval_per_image,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--budget-s", type=float, default=50.0, help="per variant, build included")
    p.add_argument("--variants", default="fp32,static-8/8/8,static-8/8/8:native")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from fracpass.experiments.data import load
    from fracpass.experiments.recipes import config_for

    torch.set_num_threads(args.threads)
    data = load(args.dataset, args.data)
    cfg = config_for(args.dataset)
    print(f"{data.describe()}; batch {cfg.batch_size}, ResNet-{6 * cfg.blocks + 2} ({cfg.shortcut} shortcuts, stem "
          f"{cfg.stem}), {torch.get_num_threads()} thread(s)")
    out = []
    for variant in args.variants.split(","):
        recipe, _, execution = variant.partition(":")
        r = time_variant(recipe, dataclasses.replace(cfg, execution=execution or "simulate"), data,
                         args.iterations, args.budget_s)
        out.append(r)
        print(f"{r['variant']:<22} {r['s_per_iteration']:.3f} s/iteration over {r['iterations']} iterations; "
              f"build {r['build_s']:.1f} s; evaluation {1e3 * r['eval_s_per_image']:.2f} ms/image")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
