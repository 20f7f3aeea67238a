"""Training-step time of eager and torch.compile-d models: FP32, bf16 autocast, fracpass simulate and native.

    python benchmarks/compile_step.py [--model resnet74|resnet20|transformer] [--batch 128] [--seq 128]
                                      [--rounds 5] [--threads 2] [--stage 3] [--backend inductor]
                                      [--match a,b]

Variants, each one forward + backward + SGD step of its own copy of the same model and batch:
FP32 eager, FP32 compiled, bf16 autocast compiled, fracpass simulate eager and compiled, fracpass native
eager and compiled (``Plan.progressive`` at ``--stage``, gradients 6/6/8/8; native compiles as one graph, its
products being registered ops, and runs them on int8/bf16 units where the CPU has them, else simulated). The
ResNets and their batch are channels_last in every variant (what native's convolutions read). The
compiled variants' first step is the compilation; it is timed apart ("compile s": first step minus the
median step). Then every round runs one step of each variant, each round starting one variant later
than the last, so the machine's drift and other processes hit all alike; the table gives each variant's
median step and its ratio to FP32 eager and to FP32 compiled from the same rounds. Each variant takes
``--warmup`` untimed steps after its first: a fresh simulated ResNet-74 took 5.9 and 8.3 s for its first
two steps and 1.3 s from the third on here (the allocator settling), which a median of few rounds
would otherwise catch.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import fracpass
import fracpass.models


def cpu_name() -> str:
    """The CPU's model name and its vector extensions that matter here (lscpu can omit the model)."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name in ("unknown CPU", "x86_64", ""):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return f"{name} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def step_fn(model, x, y, compile_backend=None, autocast=False):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    run = torch.compile(model, backend=compile_backend) if compile_backend else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def build(args):
    torch.manual_seed(0)
    conv = args.model != "transformer"
    if conv:
        base = getattr(fracpass.models, args.model)().train().to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        exclude = ("conv1", "fc")
    else:
        base = fracpass.models.transformer_d512().train()
        x = torch.randint(0, 1000, (args.batch, args.seq))
        exclude = ("head",)
    y = torch.randint(0, 10, (args.batch,))
    plan = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8), exclude=exclude)

    def transformed(execution):
        q = fracpass.transform(copy.deepcopy(base), plan, example_inputs=(x[:2],), execution=execution)
        fracpass.set_stage(q, args.stage)
        return q

    b = args.backend
    variants = {
        "fp32 eager": lambda: step_fn(copy.deepcopy(base), x, y),
        "fp32 compiled": lambda: step_fn(copy.deepcopy(base), x, y, b),
        "bf16 autocast compiled": lambda: step_fn(copy.deepcopy(base), x, y, b, autocast=True),
        "simulate eager": lambda: step_fn(transformed("simulate"), x, y),
        "simulate compiled": lambda: step_fn(transformed("simulate"), x, y, b),
        "native eager": lambda: step_fn(transformed("native"), x, y),
        "native compiled": lambda: step_fn(transformed("native"), x, y, b),
    }
    if args.match:
        keep = [m.strip() for m in args.match.split(",")]
        variants = {k: v for k, v in variants.items() if k in ("fp32 eager", "fp32 compiled") or any(m in k for m in keep)}
    stage = plan.stages[args.stage]
    return variants, f"stage {args.stage} (w/a/g {stage.w}/{stage.a}/{stage.g})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("transformer", "resnet20", "resnet74"), default="resnet74")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stage", type=int, default=3, choices=range(4), help="the ladder's stage (0..3)")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant after its first")
    parser.add_argument("--match", help="only the variants whose names contain one of these comma-separated strings "
                        "(and the two FP32 baselines)")
    args = parser.parse_args(argv)
    if args.model == "transformer" and not 1 <= args.seq <= 128:
        parser.error(f"--seq {args.seq}: transformer_d512 takes sequences of 1 to 128 tokens")
    torch.set_num_threads(args.threads)
    variants, stage = build(args)
    print(f"{args.model}: batch {args.batch}" + (f", seq {args.seq}" if args.model == "transformer" else "")
          + f", fracpass {stage}, torch {torch.__version__}, backend {args.backend}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds")
    print(f"CPU: {cpu_name()}")
    steps, first = {}, {}
    for name, make in variants.items():
        step = make()
        start = time.perf_counter()
        step()  # the compiled variants compile here; eager ones warm up (kernel builds)
        first[name] = time.perf_counter() - start
        for _ in range(args.warmup):  # glibc's heap settles: the first steps fault pages in (5-8 s, not 1.3)
            step()
        steps[name] = step
        print(f"  {name}: first step {first[name]:.1f} s", flush=True)
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n| variant | median step ms | vs FP32 eager | vs FP32 compiled | compile s |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        compile_s = f"{first[name] - med[name]:.0f}" if "compiled" in name else ""
        print(f"| {name} | {med[name] * 1e3:.0f} | {med[name] / med['fp32 eager']:.2f}x | "
              f"{med[name] / med['fp32 compiled']:.2f}x | {compile_s} |")


if __name__ == "__main__":
    main()
