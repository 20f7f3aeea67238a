"""Training-step time and peak memory of FP32, bf16, torchao and fracpass (simulate / native) on issue 11's models.

    python benchmarks/native_step.py [--model transformer|resnet20|resnet74] [--rounds 5] [--threads 2]
                                     [--batch 32] [--seq 128] [--stages 0,3] [--conv] [--gated] [--per-tensor] [--defaults]
                                     [--match a,b] [--attention sdpa|matmul] [--memory] [--profile]
                                     [--device cpu|cuda] [--reuse-large-blocks]

Model: ``fracpass.models.transformer_d512`` (dim 512, 8 heads, 4 layers, MLP 2048), sequence
128 (SDPA attention: quantized, but only q, k and v are, so it runs simulated; ``--attention matmul``
writes it as two matmuls, which quantize P = softmax(q k^T) and run on bfloat16 codes, and adds native
per-tensor with those batched products simulated, their share of the step), batch 32; or a
CIFAR ResNet (``--model resnet74 --batch 128``; native runs its convs on bfloat16 codes, ``--conv``
puts conv2d's forward on oneDNN's int8 convolution instead, opt-in); forward + backward + SGD. Variants: FP32; FP32 channels_last (ResNets);
bf16 autocast (channels_last for ResNets: the plain mixed-precision baseline); torchao's INT8
mixed-precision training (``int8_mixed_precision_training``: nn.Linear forward and backward GEMMs
in int8; transformer only, when torchao imports); fracpass ``execution="simulate"`` and
``execution="native"`` at the given stages of the 3/4/6/8 ladder (gradients 6/6/8/8); with
``--gated``, fracpass simulate and native with FracTrain's gates (``Plan.fractrain("cifar")``: gated
convolutions run per sample on bfloat16 codes; native also with per-tensor weights); with
``--per-tensor``, fracpass native with one scale per weight (``Rule(weight_scale="tensor")``), which
puts the input-gradient product on int8 (linear) or bf16 (conv) too; with ``--defaults``, native and
simulate as a user writes them (NCHW, ``Plan.static(8, 8, 8)``, per-channel weights, default options;
ResNets also with ``NativeOptions(channels_last=False)``, the layout the defaults kept before). Every round runs
one step of each variant, each round starting one variant later than the last, so noise from other
sessions and the machine's drift hit all alike (ResNets: fracpass
also with the model and batch in channels_last); the table
gives the median step and its ratio to FP32 from the same rounds.

``--memory`` adds each variant's peak memory: every variant is built in a fresh process, which
then resets the kernel's high-water mark (``/proc/self/clear_refs``) and takes 3 steps; the peak
resident set (``VmHWM``) minus the resident set before the steps is the steps' own peak
(activations kept for backward, gradients, optimizer state, workspaces). Twice: with glibc's
default allocator settings ("peak MB": what a user's process holds, freed blocks that glibc keeps
in its heap included; it varied 537-613 MB and 847-1114 MB between identical runs of two native
variants here), and with ``MALLOC_MMAP_THRESHOLD_=1048576`` ("live MB": blocks of 1 MiB and more are
mapped and returned on free, so the peak follows the tensors alive at once; the same figure within
a few MB run to run). Linux only.
``--reuse-large-blocks`` calls ``fracpass.memory.reuse_large_blocks()`` first, for every variant alike:
glibc then keeps freed blocks over 32 MB for reuse instead of unmapping them (the transformer's
33.5 MB ones cost ~100 ms of page faults a step without it; ResNet-74's blocks stay under 32 MB).
The "peak MB" processes of ``--memory`` run with it too, the "live MB" ones without (their threshold
of 1 MiB is what makes that figure).
``--profile`` adds a torch.profiler table of the native step's top CPU ops (what bounds it;
ResNets channels_last).

``--device cuda`` runs every variant on the GPU (bf16 autocast on CUDA; each step's time up to a
``torch.cuda.synchronize()``; ``--memory`` then reports each variant's ``torch.cuda.max_memory_allocated``
over 3 steps, in this process). Not run on a GPU yet: no GPU has been available to this project.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import fracpass  # noqa: E402
import fracpass.models  # noqa: E402
import fracpass.memory  # noqa: E402
import fracpass.native  # noqa: E402
from benchmarks.native_kernels import cpu_flags  # noqa: E402



DEVICE = torch.device("cpu")  # --device


def step_fn(model, x, y, autocast=False, channels_last=False):
    model, x, y = model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return step


def build(args):
    """(variants: name -> zero-argument builder of a step function, native model builder, plan)."""
    torch.manual_seed(0)
    if args.model == "transformer":
        make = lambda: fracpass.models.transformer_d512(attention=args.attention).train()
        x = torch.randint(0, 1000, (args.batch, args.seq))
    else:
        make = lambda: getattr(fracpass.models, args.model)().train()
        x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    state = make().state_dict()

    def fresh():
        model = make()
        model.load_state_dict(state)
        return model

    plan = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8))
    conv_model = args.model != "transformer"
    variants = {"fp32": lambda: step_fn(fresh(), x, y)}
    if conv_model:
        variants["fp32 channels_last"] = lambda: step_fn(fresh(), x, y, channels_last=True)
    variants["bf16 autocast" + (" channels_last" if conv_model else "")] = \
        lambda: step_fn(fresh(), x, y, autocast=True, channels_last=conv_model)
    if not conv_model:
        variants["torchao int8 mixed-precision"] = lambda: torchao_step(fresh(), x, y)

    native = fracpass.NativeOptions(kinds=fracpass.native.KINDS) if args.conv else fracpass.NativeOptions()

    def transformed(execution, stage, plan=plan, options=native):
        model = fracpass.transform(fresh().to(DEVICE), plan, example_inputs=(x[:2].to(DEVICE),), execution=execution,
                                   native=options if execution == "native" else None)
        fracpass.set_stage(model, stage)
        return model

    for stage in [int(s) for s in args.stages.split(",")]:
        for execution in ("simulate", "native"):
            name = f"{execution} stage {stage} ({plan.stages[stage].a}/{plan.stages[stage].g})"
            variants[name] = lambda e=execution, k=stage: step_fn(transformed(e, k), x, y)
            if conv_model:  # the quantizers keep a channels_last model channels_last
                variants[name + " channels_last"] = \
                    lambda e=execution, k=stage: step_fn(transformed(e, k), x, y, channels_last=True)
    if args.per_tensor:  # weight_scale="tensor": g x w on int8 too
        pt = dataclasses.replace(plan, rules=(fracpass.Rule(weight_scale="tensor"),))
        for stage in [int(s) for s in args.stages.split(",")]:
            name = f"native stage {stage} ({plan.stages[stage].a}/{plan.stages[stage].g}), per-tensor weights"
            variants[name] = lambda k=stage: step_fn(transformed("native", k, pt), x, y)
            if conv_model:
                variants[name + " channels_last"] = \
                    lambda k=stage: step_fn(transformed("native", k, pt), x, y, channels_last=True)
    if args.defaults:  # as a user writes it: NCHW, Plan.static(8, 8, 8), per-channel weights, default options
        static = fracpass.Plan.static(8, 8, 8)
        variants["native defaults (static 8/8/8)"] = lambda: step_fn(transformed("native", 0, static), x, y)
        variants["simulate defaults (static 8/8/8)"] = lambda: step_fn(transformed("simulate", 0, static), x, y)
        if conv_model:  # what the defaults ran before native chose its layout
            kept = native.replace(channels_last=False)
            variants["native defaults (static 8/8/8), layout kept"] = \
                lambda: step_fn(transformed("native", 0, static, kept), x, y)
    if args.model == "transformer" and args.attention == "matmul":  # the batched products' share: them simulated
        def bmm_simulated(stage):
            return step_fn(transformed("native", stage, pt, native.replace(min_bmm_intensity=float("inf"))), x, y)

        pt = dataclasses.replace(plan, rules=(fracpass.Rule(weight_scale="tensor"),))
        for stage in [int(s) for s in args.stages.split(",")]:
            name = (f"native stage {stage} ({plan.stages[stage].a}/{plan.stages[stage].g}), per-tensor weights, "
                    "batched products simulated")
            variants[name] = lambda k=stage: bmm_simulated(k)
    if args.gated:  # FracTrain: gates over a=(3,4,4,6,6), g=(6,6,8,8,12), weights at 4 bits
        gated = fracpass.Plan.fractrain("cifar")
        pt_gated = dataclasses.replace(gated, rules=(fracpass.Rule(weight_scale="tensor"),))
        for execution, gplan, tag in (("simulate", gated, ""), ("native", gated, ""),
                                      ("native", pt_gated, ", per-tensor weights")):
            name = f"{execution} gated (FracTrain, stage 0){tag}"
            variants[name] = lambda e=execution, p=gplan: step_fn(transformed(e, 0, p), x, y)
            if conv_model:
                variants[name + " channels_last"] = \
                    lambda e=execution, p=gplan: step_fn(transformed(e, 0, p), x, y, channels_last=True)
    if args.match:  # fp32 stays: the ratios' baseline
        keep = [m.strip() for m in args.match.split(",")]
        variants = {k: v for k, v in variants.items() if k == "fp32" or any(m in k for m in keep)}
    return variants, lambda: transformed("native", 0), x, y


def torchao_step(model, x, y):
    try:
        from torchao.prototype.quantized_training import int8_mixed_precision_training
        from torchao.quantization import quantize_
    except ImportError as e:  # optional: `pip install torchao==0.18.0 --no-deps` next to torch 2.13
        raise RuntimeError(f"torchao is not installed ({e})") from e
    quantize_(model, int8_mixed_precision_training(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
              and m.in_features % 16 == 0 and m.out_features % 16 == 0)
    return step_fn(model, x, y)


def _status_kb(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text()).group(1))


def only(args) -> None:
    """Child process of --memory: build one variant, reset the high-water mark, take 3 steps, print
    the peak resident set over the one before the steps."""
    variants, _, _, _ = build(args)
    step = variants[args.only]()
    before = _status_kb("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for _ in range(3):
        step()
    print(f"PEAK_MB {(_status_kb('VmHWM') - before) / 1024:.1f}")


LIVE = {"MALLOC_MMAP_THRESHOLD_": "1048576"}  # glibc: blocks >= 1 MiB mapped, unmapped on free


def memory(args, names, env=None) -> dict:
    peaks = {}
    base_cmd = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads), "--batch",
                str(args.batch), "--seq", str(args.seq), "--stages", args.stages] + (["--conv"] if args.conv else []) \
        + (["--reuse-large-blocks"] if args.reuse_large_blocks and env is None else []) \
        + (["--gated"] if args.gated else []) + (["--per-tensor"] if args.per_tensor else []) \
        + (["--defaults"] if args.defaults else []) \
        + (["--match", args.match] if args.match else []) \
        + ["--attention", args.attention]
    for name in names:
        done = subprocess.run(base_cmd + ["--only", name], capture_output=True, text=True,
                              env=None if env is None else {**os.environ, **env})
        line = [l for l in done.stdout.splitlines() if l.startswith("PEAK_MB")]
        peaks[name] = float(line[0].split()[1]) if line else None
        if not line:
            print(f"{name}: no memory figure ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'})")
    return peaks


def cuda_memory(steps) -> dict:
    """Each variant's peak allocated CUDA memory over 3 steps beyond what it held before them."""
    peaks = {}
    for name, step in steps.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("transformer", "resnet20", "resnet74"), default="transformer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--stages", default="0,3", help="ladder stages to run native/simulate at (0..3)")
    parser.add_argument("--conv", action="store_true", help="conv2d's forward on int8 instead of bf16 (opt-in)")
    parser.add_argument("--gated", action="store_true", help="add fracpass native with FracTrain's gates")
    parser.add_argument("--defaults", action="store_true",
                        help="add native and simulate as a user writes them: NCHW, Plan.static(8, 8, 8), per-channel "
                             "weights, default NativeOptions (ResNets: also with NativeOptions(channels_last=False))")
    parser.add_argument("--per-tensor", action="store_true",
                        help="add fracpass native with per-tensor weight scales (all three products on int8)")
    parser.add_argument("--match", help="run only the variants whose names contain one of these comma-separated "
                        "strings (and fp32, the baseline), e.g. --match gated,autocast")
    parser.add_argument("--memory", action="store_true", help="add each variant's peak memory (one process each)")
    parser.add_argument("--attention", choices=("sdpa", "matmul"), default="sdpa",
                        help="the transformer's attention: SDPA (simulated under native) or two matmuls (bf16)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--reuse-large-blocks", action="store_true",
                        help="fracpass.memory.reuse_large_blocks() for every variant: glibc keeps freed blocks over "
                        "32 MB for reuse instead of unmapping them")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every variant runs")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model == "transformer" and not 1 <= args.seq <= 128:
        parser.error(f"--seq {args.seq}: transformer_d512 takes sequences of 1 to 128 tokens")
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build or on this machine")
    if args.reuse_large_blocks:
        why = fracpass.memory.reuse_large_blocks()
        if why is not None:
            parser.error(f"--reuse-large-blocks: not applied: {why}")
    if args.only:
        return only(args)
    variants, native_model, x, y = build(args)
    steps = {}
    for name, builder in variants.items():
        try:
            steps[name] = builder()
        except Exception as e:  # say what fails (e.g. torchao absent) and go on with the rest
            print(f"{name}: left out: {type(e).__name__}: {e}")
    print(f"{args.model}: torch {torch.__version__}, {args.threads} threads, batch {args.batch}"
          + (f", seq {args.seq}" if args.model == "transformer" else "") + f", {args.rounds} interleaved rounds"
          + (", large freed blocks reused (fracpass.memory.reuse_large_blocks)" if args.reuse_large_blocks else ""))
    print(f"CPU: {cpu_flags()}" if DEVICE.type == "cpu" else
          f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    probe = native_model()
    with torch.no_grad():
        probe(x.to(DEVICE))  # a call: the paths that depend on the operands (batched products, sizes) are this batch's
    native_paths = fracpass.native.op_paths(probe)
    print("native paths at stage 0:", sorted({p for p, _ in native_paths.values()}), "over", len(native_paths), "ops")
    for name, step in list(steps.items()):  # warm-up (and kernel builds)
        try:
            step()
        except Exception as e:
            print(f"{name}: left out: the step failed: {type(e).__name__}: {e}")
            del steps[name]
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        # each round starts one variant later: the machine drifts within a round (measured here: four
        # identical ResNet-74 models in a fixed order differed 496-594 ms by position, rotated 516-535 ms)
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    if args.memory and DEVICE.type == "cuda":
        peaks, live = cuda_memory(steps), {}
    else:
        peaks = memory(args, list(steps)) if args.memory else {}
        live = memory(args, list(steps), LIVE) if args.memory else {}
    base_ms = 1e3 * statistics.median(times["fp32"])
    tables = [t for t in (peaks, live) if t]
    titles = ["peak MB" if DEVICE.type == "cpu" else "CUDA peak MB", "live MB"][:len(tables)]
    print("| variant | step ms | x fp32 | min..max ms |" + "".join(f" {t} | x fp32 |" for t in titles))
    print("|---|---:|---:|---:|" + "---:|---:|" * len(tables))
    for name, t in times.items():
        ms = 1e3 * statistics.median(t)
        row = f"| {name} | {ms:.1f} | {ms / base_ms:.2f} | {1e3 * min(t):.0f}..{1e3 * max(t):.0f} |"
        for table in tables:
            m, m0 = table.get(name), table.get("fp32")
            row += f" {m:.0f} | {m / m0:.2f} |" if m is not None and m0 else " - | - |"
        print(row)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step = step_fn(native_model(), x, y, channels_last=args.model != "transformer")  # as the fastest variant
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
