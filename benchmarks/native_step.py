"""Training-step time of FP32, fracpass simulate and fracpass native on issue 11's transformer (one run, interleaved).

    python benchmarks/native_step.py [--model transformer|resnet20|resnet74] [--rounds 5] [--threads 2]
                                     [--batch 32] [--seq 128] [--stages 0,3] [--conv] [--profile]

Model: ``fracpass.models.TransformerClassifier`` at dim 512, 8 heads, 4 layers, MLP 2048, sequence
128 (SDPA attention: quantized, but it has no native path and runs simulated), batch 32; or a
CIFAR ResNet (``--model resnet74 --batch 128``; ``--conv`` opts its convs into the int8 forward,
which is off by default); forward + backward + SGD. Variants: FP32; bf16 autocast (the plain mixed-precision baseline); fracpass
``execution="simulate"`` and ``execution="native"`` at the given stages of the 3/4/6/8 ladder
(gradients 6/6/8/8). Every round runs one step of each variant, so noise from other sessions on the
machine hits all alike; the table gives the median step and its ratio to FP32 from the same rounds.
``--profile`` adds a torch.profiler table of the native step's top CPU ops (what bounds it).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import fracpass  # noqa: E402
import fracpass.models  # noqa: E402
import fracpass.native  # noqa: E402
from benchmarks.native_kernels import cpu_flags  # noqa: E402
from fracpass.models import TransformerClassifier  # noqa: E402


def step_fn(model, x, y, autocast=False):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("transformer", "resnet20", "resnet74"), default="transformer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--stages", default="0,3", help="ladder stages to run native/simulate at (0..3)")
    parser.add_argument("--conv", action="store_true", help="also lower conv2d (opt-in native path)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "transformer":
        base = TransformerClassifier(vocab=1000, dim=512, heads=8, depth=4, mlp=2048, max_len=args.seq,
                                     dropout=0.0).train()
        x = torch.randint(0, 1000, (args.batch, args.seq))
    else:
        base = getattr(fracpass.models, args.model)().train()
        x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    plan = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8))
    steps = {"fp32": step_fn(base, x, y), "bf16 autocast": step_fn(base, x, y, autocast=True)}
    models = {}
    for execution in ("simulate", "native"):
        models[execution] = fracpass.transform(base, plan, example_inputs=(x[:2],), execution=execution)
    if args.conv:
        fracpass.native.LowerNativePass(fracpass.native.NATIVE_KINDS)(models["native"])
    stages = [int(s) for s in args.stages.split(",")]
    for stage in stages:
        for execution, model in models.items():
            def staged(model=model, stage=stage, inner=step_fn(model, x, y)):
                fracpass.set_stage(model, stage)
                inner()

            steps[f"{execution} stage {stage} ({plan.stages[stage].a}/{plan.stages[stage].g})"] = staged
    print(f"{args.model}: torch {torch.__version__}, {args.threads} threads, batch {args.batch}, seq {args.seq}, "
          f"{args.rounds} interleaved rounds")
    print(f"CPU: {cpu_flags()}")
    native_paths = fracpass.native.op_paths(models["native"])
    print("native paths at stage 0:", sorted({p for p, _ in native_paths.values()}), "over", len(native_paths), "ops")
    for step in steps.values():  # warm-up (and kernel builds)
        step()
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base_ms = 1e3 * statistics.median(times["fp32"])
    print(f"{'variant':34s} {'step ms':>9s} {'x fp32':>7s}   (min..max ms)")
    for name, t in times.items():
        ms = 1e3 * statistics.median(t)
        print(f"{name:34s} {ms:9.1f} {ms / base_ms:7.2f}   ({1e3 * min(t):.0f}..{1e3 * max(t):.0f})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        fracpass.set_stage(models["native"], stages[-1])
        step = step_fn(models["native"], x, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
