"""Training-step overhead of quantized training, and transform time, side by side in one run.

    python benchmarks/step_overhead.py [--model resnet74] [--batch 128] [--reps 7] [--skip-ao-1202]

Step: forward + backward + SGD of a CIFAR ResNet, batch of 3x32x32, ``torch.set_num_threads(2)``,
for FP32; fracpass static 8/8/8 (w/a/g, gradients quantized); torch.ao ``prepare_qat_fx``
(weights and activations only); a FracTrain-style plain-PyTorch quantizer; fracpass with DFQ gates
(K=5 options, block granularity, gate loss included), against static 8/8/8; and the authors' DFQ
execution (every option computed, outputs mixed: benchmarks/kway_reference.py). Repetitions are
interleaved (one step of each variant per round) and the medians compared, so machine noise hits
all variants alike. Transform time: capture + all passes for ResNet-20, -74 and -1202 (static and
gated plans), against torch.ao ``prepare_qat_fx``.
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import fracpass  # noqa: E402
from benchmarks import fractrain_reference, kway_reference  # noqa: E402
from examples import models  # noqa: E402


def ao_qat(model, x):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))


def step_fn(model, x, y, gated=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), y)
        if gated:
            loss = loss + fracpass.gate_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_steps(args) -> None:
    torch.manual_seed(0)
    base = getattr(models, args.model)().train()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    variants = {
        "fp32": copy.deepcopy(base),
        "fracpass 8/8/8": fracpass.transform(base, fracpass.Plan.static(8, 8, 8), example_inputs=(x[:2],)),
        "torch.ao QAT (w+a)": ao_qat(base, x[:2]),
        "FracTrain-style": fractrain_reference.convert(copy.deepcopy(base)),
    }
    gates = fracpass.Gates(a=(3, 4, 4, 6, 6), g=(6, 6, 8, 8, 12), w=4, granularity="block")
    if not args.no_gates:
        variants["fracpass gated K=5"] = fracpass.transform(base, fracpass.Plan.static(4, 8, 8).with_gates(gates),
                                                            example_inputs=(x[:2],))
        variants["authors' K-way gated"] = kway_reference.KWayResNet(copy.deepcopy(base), gates.a, gates.g, gates.w)
    steps = {name: step_fn(m, x, y, gated=name == "fracpass gated K=5") for name, m in variants.items()}
    times = {name: [] for name in variants}
    for step in steps.values():  # warm-up
        step()
    for r in range(args.reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{args.reps}", file=sys.stderr, flush=True)
    fp32 = statistics.median(times["fp32"])
    print(f"\nTraining step, {args.model}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:22s} {med * 1e3:8.1f} ms   {med / fp32:5.2f}x FP32")
    if not args.no_gates:
        static = statistics.median(times["fracpass 8/8/8"])
        for name in ("fracpass gated K=5", "authors' K-way gated"):
            print(f"  {name} over fracpass static 8/8/8: {statistics.median(times[name]) / static:.2f}x")


def bench_kway_scaling(args) -> None:
    """How the authors' every-option execution grows with K (one option's bits repeated K times)."""
    import resource

    torch.manual_seed(0)
    base = getattr(models, args.model)().train()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    print(f"\nAuthors' K-way DFQ execution, {args.model}, batch {args.batch}: step time and peak memory by K")
    for k in (1, 2, 5):
        model = kway_reference.KWayResNet(copy.deepcopy(base), (4,) * k, (8,) * k, 4)
        step = step_fn(model, x, y)
        step()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        print(f"  K={k}: {statistics.median(times) * 1e3:8.1f} ms, process peak RSS so far {peak:.1f} GiB", flush=True)


def bench_transform(args) -> None:
    print("\nTransform time (capture + all passes), fracpass static 8/8/8 vs torch.ao prepare_qat_fx")
    x = torch.randn(2, 3, 32, 32)
    # first calls pay one-off imports and caches; keep them out of both sides' figures
    fracpass.transform(models.resnet20(), fracpass.Plan.static(8, 8, 8), example_inputs=(x,))
    ao_qat(models.resnet20(), x)
    for depth in (20, 74, 1202):
        model = models.CifarResNet(depth).train()
        best = float("inf")
        for _ in range(3 if depth < 1202 else 2):
            start = time.perf_counter()
            q = fracpass.transform(model, fracpass.Plan.static(8, 8, 8), example_inputs=(x,))
            best = min(best, time.perf_counter() - start)
        nodes = len(q.graph.nodes)
        line = f"  ResNet-{depth:<5d} fracpass {best * 1e3:8.1f} ms  {nodes:6d} nodes  {best / nodes * 1e6:6.1f} us/node"
        if not args.no_gates:
            gated_plan = fracpass.Plan.static(4, 8, 8).with_gates(fracpass.Gates())
            start = time.perf_counter()
            g = fracpass.transform(model, gated_plan, example_inputs=(x,))
            elapsed = time.perf_counter() - start
            line += f"   gated {elapsed * 1e3:8.1f} ms ({len(g.graph.nodes)} nodes)"
        if not (depth == 1202 and args.skip_ao_1202):
            start = time.perf_counter()
            ao_qat(model, x)
            line += f"   torch.ao {1e3 * (time.perf_counter() - start):9.1f} ms"
        print(line, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet74")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-ao-1202", action="store_true", help="skip torch.ao on ResNet-1202 (~1 min)")
    parser.add_argument("--only", choices=("steps", "transform"))
    parser.add_argument("--no-gates", action="store_true", help="leave out the two gated variants")
    parser.add_argument("--kway-scaling", action="store_true", help="only: the K-way execution at K = 1, 2, 5")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.kway_scaling:
        bench_kway_scaling(args)
        return 0
    if args.only != "transform":
        bench_steps(args)
    if args.only != "steps":
        bench_transform(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
