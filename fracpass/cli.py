"""Quantize a PyTorch model's training FracTrain-style, then cost, plan, check, export or time it; or run the demo.

    fracpass --version
    fracpass transform --model pkg.module:factory --plan plan.toml [--input-shape 1,3,32,32]
    fracpass cost --model pkg.module:factory --plan plan.toml --input-shape 1,3,32,32 [--target bitfusion] [--json]
    fracpass plan --model pkg.module:factory --plan plan.toml -o stages.toml [--budget 0.35 --total-steps 64000]

    fracpass check --model pkg.module:factory --plan plan.toml --golden golden/ [--update] [--min-coverage 0.95]
                   [--format text|json|github]
    fracpass export --model pkg.module:factory --plan plan.toml --stage -1 --input-shape 1,3,32,32 -o model.onnx
    fracpass bench --model pkg.module:factory --plan plan.toml --input-shape 32,3,32,32 [--execution native]
                   [--target epyc9655] [--stages 0,-1] [--repeats 5] [--threads 2] [--json]
    fracpass demo [--quick] [--out fracpass-demo] [--threads 1]

Exit codes: 0 success; 1 (check) the graph differs from a golden file, a golden file is missing, or
coverage is below --min-coverage; 2 bad usage, a model that does not load, or a plan or model
fracpass rejects (the message says what and how to fix it).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from fracpass.errors import FracpassError

EXIT_OK, EXIT_USAGE = 0, 2


class CliError(Exception):
    """A user-facing command-line failure: printed as one message, exit code 2."""


def load_model(spec: str) -> torch.nn.Module:
    """Build the model named ``pkg.module:factory`` (the current directory is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--model {spec!r}: expected 'package.module:factory', e.g. 'fracpass.models:resnet20'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise CliError(f"--model {spec!r}: cannot import {module_name!r}: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise CliError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
    try:
        model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    except Exception as e:
        raise CliError(f"--model {spec!r}: calling {attr}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"--model {spec!r}: {attr} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def example_input(shape: Optional[str], dtype: str) -> tuple:
    if not shape:
        return ()
    try:
        dims = [int(d) for d in shape.split(",")]
    except ValueError as e:
        raise CliError(f"--input-shape {shape!r}: expected comma-separated integers, e.g. 1,3,32,32") from e
    if any(d <= 0 for d in dims):
        raise CliError(f"--input-shape {shape!r}: every dimension must be positive")
    if dtype == "int64":
        return (torch.zeros(dims, dtype=torch.int64),)
    return (torch.randn(dims),)


def int_list(option: str, text: str, example: str) -> list:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as e:
        raise CliError(f"{option} {text!r}: expected comma-separated integers, e.g. {example}") from e


def output_path(path: str) -> Path:
    """Check ``-o path`` before any work: its directory exists and it is not itself a directory."""
    out = Path(path)
    if out.is_dir():
        raise CliError(f"-o {out}: is a directory; give a file name, e.g. {out / 'out'}")
    if not out.parent.is_dir():
        raise CliError(f"-o {out}: directory {out.parent} does not exist; create it first (mkdir -p {out.parent})")
    if not os.access(out.parent, os.W_OK):
        raise CliError(f"-o {out}: directory {out.parent} is not writable; choose another path")
    return out


def _first_layer(model: torch.nn.Module) -> str:
    """What the model's first input-facing layer takes, e.g. "its first layer conv1 (Conv2d) takes
    (N, 3, H, W)"; empty when the first layer is of no kind named here."""
    spatial = {1: "L", 2: "H, W", 3: "D, H, W"}
    for name, m in model.named_modules():
        kind = type(m).__name__
        if isinstance(m, torch.nn.modules.conv._ConvNd) and len(m.kernel_size) in spatial:
            return f"its first layer {name} ({kind}) takes (N, {m.in_channels}, {spatial[len(m.kernel_size)]})"
        if isinstance(m, torch.nn.Linear):
            return f"its first layer {name} ({kind}) takes (N, ..., {m.in_features})"
        if isinstance(m, torch.nn.Embedding):
            return (f"its first layer {name} ({kind}) takes token ids below {m.num_embeddings}, "
                    "(N, T) with --input-dtype int64")
    return ""


def check_runs(model: torch.nn.Module, inputs: tuple, shape: str) -> None:
    """Run the plain model once (eval, no grad) on the example input, so a wrong --input-shape is
    reported as such rather than from deep inside a pass or the export."""
    if not inputs:
        return
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except Exception as e:
        where = "; ".join(filter(None, [_first_layer(model), str(e).strip().splitlines()[0] if str(e).strip() else ""]))
        raise CliError(f"--input-shape {shape}: the model cannot run on input 0 of shape {tuple(inputs[0].shape)}: "
                       f"{where or type(e).__name__}") from e
    finally:
        model.train(was_training)


def _transformed(args, default_plan=None, inputs_needed_for: str = "", execution: str = "simulate"):
    """(plan, example inputs, transformed model) from the common --model/--plan/--input-shape options."""
    import fracpass

    model = load_model(args.model)
    plan = fracpass.Plan.load(args.plan) if args.plan else (default_plan or fracpass.Plan.static())
    inputs = example_input(args.input_shape, args.input_dtype)
    if plan.gates is not None and not inputs:
        inputs_needed_for = inputs_needed_for or "for a plan with gates: gate sizes and option costs depend on it"
    if inputs_needed_for and not inputs:
        raise CliError(f"--input-shape is required {inputs_needed_for} (e.g. --input-shape 1,3,32,32)")
    check_runs(model, inputs, args.input_shape)
    return plan, inputs, fracpass.transform(model, plan, example_inputs=inputs, capture_method=args.capture,
                                            execution=execution)


def _transform(args) -> int:
    import fracpass

    _, _, qmodel = _transformed(args)
    if args.stage is not None:
        fracpass.set_stage(qmodel, args.stage)
    print(fracpass.summary(qmodel))
    return EXIT_OK


def _cost(args) -> int:
    import fracpass

    _, _, qmodel = _transformed(args, inputs_needed_for="for cost: costs depend on the input's shape")
    report = fracpass.cost(qmodel, target=args.target, stage=args.stage)
    if args.steps_per_stage:
        steps = int_list("--steps-per-stage", args.steps_per_stage, "8190,8190,7800,40000")
        totals = report.training(steps, batch_size=args.batch_size)
    if args.json:
        data = json.loads(report.to_json())
        if args.steps_per_stage:
            data["training"] = _totals_dict(totals)
        print(json.dumps(data, indent=2))
    else:
        print(report)
        if args.steps_per_stage:
            print(totals)
    return EXIT_OK


def _bench(args) -> int:
    from fracpass.bench import bench

    stages = int_list("--stages", args.stages, "0,-1") if args.stages else None
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads {args.threads}: give a positive number of threads, e.g. --threads 2")
    if args.reuse_large_blocks:
        from fracpass.memory import reuse_large_blocks

        why = reuse_large_blocks()
        if why is not None:
            print(f"fracpass bench: --reuse-large-blocks not applied: {why}", file=sys.stderr)
    _, inputs, qmodel = _transformed(args, inputs_needed_for="for bench: the step is timed on a batch of that shape",
                                     execution=args.execution)
    report = bench(qmodel, inputs, target=args.target, stages=stages, repeats=args.repeats, threads=args.threads,
                   progress=None if args.json else lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EXIT_OK


def _totals_dict(totals) -> dict:
    """``TrainingTotals`` as JSON: the schedule's totals and the static last-stage plan's."""
    return {"steps_per_stage": list(totals.steps_per_stage), "batch_size": totals.batch_size,
            "bitops": totals.bitops, "static_bitops": totals.static_bitops, "bitops_saving": totals.bitops_saving,
            "latency_s": totals.latency_s, "static_latency_s": totals.static_latency_s,
            "latency_saving": totals.latency_saving, "energy_j": totals.energy_j,
            "static_energy_j": totals.static_energy_j}


def demo_out_dir(path: str) -> Path:
    """Check ``--out folder`` before the demo trains: it is, or can become, a writable folder."""
    out = Path(path)
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        what = "is a file" if existing == out else f"lies under {existing}, which is a file"
        raise CliError(f"--out {out}: {what}; the demo writes a folder of results there, so give a folder "
                       f"(e.g. --out fracpass-demo) or move the file away")
    if not os.access(existing, os.W_OK):
        raise CliError(f"--out {out}: folder {existing} is not writable; choose another, e.g. --out /tmp/fracpass-demo")
    return out


def _demo(args) -> int:
    from fracpass.experiments.demo import run

    if args.threads < 1:
        raise CliError(f"--threads {args.threads}: give a positive number of threads, e.g. --threads 1")
    demo_out_dir(args.out)
    return run(args)


def _plan(args) -> int:
    import fracpass

    output = output_path(args.output) if args.output else None
    model = load_model(args.model)
    plan = fracpass.Plan.load(args.plan) if args.plan else fracpass.Plan.progressive()
    if args.budget is not None or args.total_steps is not None:
        if args.budget is None or args.total_steps is None:
            raise CliError("--budget and --total-steps go together, e.g. --budget 0.35 --total-steps 64000")
        plan = dataclasses.replace(plan, switch=fracpass.Budget(args.budget, args.total_steps, args.granularity))
    inputs = example_input(args.input_shape, args.input_dtype)
    if plan.switch is not None and isinstance(plan.switch, fracpass.Budget) and not inputs:
        raise CliError("budget mode costs the model: give --input-shape (e.g. 1,3,32,32)")
    if plan.gates is not None and not inputs:
        raise CliError("--input-shape is required for a plan with gates: gate sizes and option costs depend on it "
                       "(e.g. --input-shape 1,3,32,32)")
    check_runs(model, inputs, args.input_shape)
    qmodel = fracpass.transform(model, plan, example_inputs=inputs, capture_method=args.capture)
    staged = fracpass.schedule(qmodel, plan)
    if output is not None:
        try:
            staged.save(output)
        except OSError as e:
            raise CliError(f"-o {output}: cannot write: {e.strerror}") from e
        print(f"wrote {output}")
    print(staged)
    return EXIT_OK


EXIT_MISMATCH = 1


def _check(args) -> int:
    """Compare the graph text (and the StagePlan, for a ladder) with golden files; check coverage."""
    import json as _json
    from pathlib import Path

    import fracpass
    from fracpass.check import compare_text

    if args.min_coverage is not None and not 0 <= args.min_coverage <= 1:
        raise CliError(f"--min-coverage {args.min_coverage}: give a fraction between 0 and 1, e.g. 0.95")
    plan, _, qmodel = _transformed(args)
    name = args.name or args.model.partition(":")[2]
    golden = Path(args.golden)
    files = {golden / f"{name}.graph.txt": fracpass.graph_text(qmodel)}
    if plan.num_stages > 1:
        files[golden / f"{name}.stages.toml"] = fracpass.schedule(qmodel, plan).to_toml()
    cov = fracpass.coverage(qmodel)
    problems, mismatches = [], []
    if args.update:
        golden.mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            path.write_text(text)
    else:
        for path, text in files.items():
            if not path.exists():
                problems.append(f"{path}: golden file missing; create it with --update")
                continue
            mismatch = compare_text(path.read_text(), text, str(path))
            if mismatch is not None:
                mismatches.append(mismatch)
    below = args.min_coverage is not None and cov.minimum < args.min_coverage
    if below:
        problems.append(f"coverage {cov.minimum:.1%} is below --min-coverage {args.min_coverage:.1%}")
    failed = bool(problems or mismatches)
    if args.format == "json":
        print(_json.dumps({"ok": not failed, "updated": bool(args.update), "files": [str(p) for p in files],
                           "problems": problems, "coverage": cov.to_dict(),
                           "mismatches": [{"file": m.path, "summary": m.summary, "diff": m.diff} for m in mismatches]},
                          indent=2))
    elif args.format == "github":
        for m in mismatches:
            detail = "%0A".join(m.summary[:20])  # workflow-command newline
            print(f"::error file={m.path},title=fracpass graph changed::{detail}")
        for p in problems:
            print(f"::error title=fracpass check::{p}")
        for op, roles, why in cov.unquantized:
            print(f"::notice title=fracpass coverage::{op} [{roles}] not quantized: {why}")
        if not failed:
            print(f"::notice title=fracpass check::graph matches golden files; min coverage {cov.minimum:.1%}")
    else:
        for m in mismatches:
            print(m)
        for p in problems:
            print(f"FAIL: {p}")
        print(cov)
        print(("updated " + ", ".join(str(p) for p in files)) if args.update else
              ("FAILED" if failed else "OK: graph matches the golden files"))
    return EXIT_MISMATCH if failed else EXIT_OK


def _export(args) -> int:
    import fracpass

    output_path(args.output)
    if args.calibrate < 1:
        raise CliError(f"--calibrate {args.calibrate}: the exported activation quantizers take their ranges from "
                       "calibration batches; give at least 1, e.g. --calibrate 4 (the default)")
    plan, inputs, qmodel = _transformed(args, inputs_needed_for="for export")
    stage = -1 if args.stage is None else args.stage
    fracpass.set_stage(qmodel, stage)
    # activation ranges come from training batches; here synthetic ones stand in (say so)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(args.calibrate):
            qmodel(*example_input(",".join(str(max(d, 8) if i == 0 else d) for i, d in
                                            enumerate(inputs[0].shape)), args.input_dtype))
    print(f"calibrated activation ranges on {args.calibrate} synthetic batches; export a model trained with "
          "fracpass.export_onnx for ranges from real data")
    fracpass.export_onnx(qmodel, args.output, stage=stage, dynamic_batch=not args.static_batch)
    print(f"wrote {args.output} (stage {stage % plan.num_stages} of {plan.num_stages})")
    return EXIT_OK


STAGE_HELP = {
    "transform": "stage whose bits the summary shows (default 0; negative counts from the end)",
    "cost": "stage of the per-op table (default 0); the BitOPs of every stage are printed either way",
    "export": "stage to export (default -1, the last)",
}  # plan and check cover every stage, bench times those of --stages: they take no --stage


def _add_model_args(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--model", required=True, help="package.module:factory returning an nn.Module")
    p.add_argument("--plan", help="plan TOML file (default: static 8/8/8)")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,32,32")
    p.add_argument("--input-dtype", choices=("float32", "int64"), default="float32",
                   help="example input dtype (int64 for token ids)")
    p.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                   help="how to capture the model: auto (torch.fx, falling back to non-strict torch.export where fx "
                        "fails), fx, or export (default auto)")
    if command in STAGE_HELP:
        p.add_argument("--stage", type=int, help=STAGE_HELP[command])


def build_parser() -> argparse.ArgumentParser:
    from fracpass import __version__

    parser = argparse.ArgumentParser(prog="fracpass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transform", help="transform a model with a plan and print the summary table")
    _add_model_args(t, "transform")
    t.set_defaults(run=_transform)
    c = sub.add_parser("cost", help="MACs, BitOPs per stage, and energy/latency on a hardware target")
    _add_model_args(c, "cost")
    c.add_argument("--target", help="hardware profile: a built-in name (bitfusion, a100, h100, xeon8380, epyc9655) or a .toml path")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--steps-per-stage", help="whole-schedule totals for these steps per stage, e.g. 8190,8190,7800,40000")
    c.add_argument("--batch-size", type=int, help="batch size for --steps-per-stage (default: the input shape's)")
    c.set_defaults(run=_cost)
    pl = sub.add_parser("plan", help="emit the per-stage precision plan (StagePlan) of a model and plan")
    _add_model_args(pl, "plan")
    pl.add_argument("-o", "--output", help="write the StagePlan TOML here")
    pl.add_argument("--budget", type=float, help="training budget as a fraction of the static last-stage plan")
    pl.add_argument("--total-steps", type=int, help="total training steps, for --budget")
    pl.add_argument("--granularity", type=int, default=390, help="stage boundaries are multiples of this (default 390)")
    pl.set_defaults(run=_plan)
    ch = sub.add_parser("check", help="compare the rewritten graph with golden files and check coverage (for CI)")
    _add_model_args(ch, "check")
    ch.add_argument("--golden", required=True, help="directory of golden files (<name>.graph.txt, <name>.stages.toml)")
    ch.add_argument("--name", help="golden file name stem (default: the factory's name)")
    ch.add_argument("--update", action="store_true", help="write the golden files instead of comparing")
    ch.add_argument("--min-coverage", type=float, help="fail below this share of compute ops quantized, every role")
    ch.add_argument("--format", choices=("text", "json", "github"), default="text",
                    help="text for people (default), json for scripts, or github: workflow commands that annotate "
                         "a GitHub Actions run")
    ch.set_defaults(run=_check)
    ex = sub.add_parser("export", help="export the model at a stage as ONNX with Q/DQ quantizers")
    _add_model_args(ex, "export")
    ex.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    ex.add_argument("--calibrate", type=int, default=4, help="synthetic batches that set activation ranges (default 4)")
    ex.add_argument("--static-batch", action="store_true", help="fix the batch dimension at the input shape's")
    ex.set_defaults(run=_export)
    be = sub.add_parser("bench", help="time forward + backward per stage and per compute op beside the hardware "
                                      "profile's predicted latency")
    _add_model_args(be, "bench")
    be.add_argument("--execution", choices=("simulate", "native"), default="simulate",
                    help="simulate (float32 fake quantization) or native (int8 linear/matmul and bf16 "
                         "convolution products where the bits allow)")
    be.add_argument("--target", default="epyc9655", help="a cpu profile with a core count (default epyc9655, the "
                                                         "AMD EPYC class this project runs on; or xeon8380, or a .toml)")
    be.add_argument("--stages", help="stages to time, e.g. 0,-1 (default: every stage of the plan)")
    be.add_argument("--repeats", type=int, default=5, help="timed steps per stage (default 5; the median is shown)")
    be.add_argument("--threads", type=int, help="torch threads (default: torch's; the profile is scaled to them)")
    be.add_argument("--json", action="store_true", help="print the report as JSON")
    be.add_argument("--reuse-large-blocks", action="store_true",
                    help="keep glibc from unmapping freed blocks over 32 MB, which the next step then faults in afresh "
                         "(fracpass.native.reuse_large_blocks; process-wide, the heap keeps its peak)")
    be.set_defaults(run=_bench)
    from fracpass.experiments.demo import add_arguments

    de = sub.add_parser("demo", help="train FP32, static 8/8/8 and FracTrain on real digits; print the comparison "
                                     "table and write the plots (about 30 s on 2 cores)")
    add_arguments(de)
    de.set_defaults(run=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.run(args)
    except (CliError, FracpassError) as e:
        print(f"fracpass {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
