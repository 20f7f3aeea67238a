"""FracTrain reproduced on real images: every recipe x several seeds, costed by fracpass's cost pass.

    python examples/fractrain_mnist.py [--dataset mnist5k|digits|fashion-mnist|cifar10-dir] [--data FOLDER]
                                       [--model resnet8|resnet20|resnet20-proj] [--stem fp32|stage-bits]
                                       [--execution simulate|native] [--seeds 0,1,2,3,4] [--recipes ...]
                                       [--quick] [--out DIR] [--threads 1]
    python examples/fractrain_mnist.py --merge DIR [DIR ...] --out DIR   # one table from parts
    python examples/fractrain_mnist.py --replot DIR      # table and plots again from DIR/results.json
    python examples/fractrain_mnist.py --status DIR [DIR ...]   # each run there: finished, or how far

Recipes, all with the same network, iterations, SGD optimiser and learning-rate schedule, data
order and seeds: FP32; static 8/8/8 (FracTrain's 8-bit baseline); static 6/8 and 4/6; PFQ (the
ladder 3/4/6/8, gradients 6/6/8/8, stepped by LossPlateau(threshold 0.05, decay 0.3)); DFQ
(per-block gates at a fixed cost target); FracTrain (gates whose target the same loss-plateau rule
steps up). The classifier stays at full precision; the stem too with ``--stem fp32``, while
``--stem stage-bits`` quantizes it at the stage bits in static and PFQ recipes as FracTrain's plain
ResNet code does (see ``fracpass.experiments.recipes``). Each data set has its defaults
(``recipes.CONFIGS``): digits and MNIST-5k a ResNet-8 with parameter-free shortcuts and an FP32
stem; Fashion-MNIST FracTrain's ResNet-20 (1x1 conv + BN shortcuts), the stem at the stage bits,
one-epoch plateau windows, 5,000 training images held out for validation (the default ``--data``
is the folder ``apt-get install -y dataset-fashion-mnist`` fills).

Each finished run is written at once to ``--out``/runs/<recipe>-seed<k>.json; started again with
the same ``--out``, the comparison reads those and trains only what is missing, so long runs can
span sessions. ``--merge`` joins folders of runs (or of results.json) into one table in ``--out``.

It writes ``results.json`` (every run's record: losses, stages, gate choices per batch, accuracy
per evaluation, costs), ``results.md`` (the table, the floors, energy and latency per hardware
profile, the gates' option mix per stage) and the plots into ``--out``. ``--quick`` runs 2 seeds
for a few dozen iterations (Fashion-MNIST: a dozen, on 512 training images): a smoke test of the
whole comparison, not a result.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist5k", choices=("mnist5k", "digits", "fashion-mnist", "cifar10-dir"))
    parser.add_argument("--data", help="for --dataset cifar10-dir: the local CIFAR-10 folder (binary or Python batches); "
                                       "for fashion-mnist: the folder of its idx files (default "
                                       "/usr/share/datasets/fashion-mnist)")
    parser.add_argument("--model", choices=("resnet8", "resnet20", "resnet20-proj"),
                        help="the network (default: the data set's; resnet20-proj: 1x1 conv + BN shortcuts)")
    parser.add_argument("--stem", choices=("fp32", "stage-bits"),
                        help="stem precision in static and PFQ recipes (default: the data set's)")
    parser.add_argument("--execution", choices=("simulate", "native"), help="fracpass.transform's execution "
                                                                           "(default simulate)")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2,3,4; --quick: 0,1)")
    parser.add_argument("--recipes", help="comma-separated subset of fp32,static-8/8/8,static-6/8,static-4/6,pfq,dfq,fractrain")
    parser.add_argument("--quick", action="store_true", help="2 seeds, a few dozen iterations: a smoke test")
    parser.add_argument("--iterations", type=int, help="override the data set's iterations")
    parser.add_argument("--out", default="fractrain-results", help="output folder (default ./fractrain-results)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="one line per run instead of progress bars")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--replot", metavar="DIR", help="rewrite the summary, table and plots from DIR/results.json's "
                                                        "runs")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="merge parts run separately (e.g. one --recipes "
                                                                 "each, side by side, or over several sessions; each "
                                                                 "DIR's results.json, else its runs/*.json) into --out")
    parser.add_argument("--status", nargs="+", metavar="DIR", help="list the runs in these --out folders: finished "
                                                                  "ones with their accuracy, unfinished ones with the "
                                                                  "iteration their checkpoint goes on from")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    import torch

    from fracpass.errors import FracpassError
    from fracpass.experiments.compare import (console_table, floors, merge_results, run_comparison, summarize,
                                              write_results)
    from fracpass.experiments.data import load
    from fracpass.experiments.model import MODELS
    from fracpass.experiments.recipes import QUICK_SLICE, config_for
    from fracpass.experiments.runfiles import load_part, status, status_table

    if args.status:  # every folder, the ones in error named (exit 2) after the rest
        failed = False
        for folder in args.status:
            try:
                print(f"{folder}:\n" + (status_table(status(folder)) or "no runs yet"))
            except FracpassError as e:
                print(f"fractrain_mnist: error: {e}", file=sys.stderr)
                failed = True
        return 2 if failed else 0
    if args.replot or args.merge:
        if args.merge:
            try:
                results = merge_results([load_part(d) for d in args.merge])
            except (FracpassError, ValueError) as e:
                print(f"fractrain_mnist: error: {e}", file=sys.stderr)
                return 2
            command = " && ".join(p["command"] for p in results["parts"] if p["command"])
        else:  # summary and floors recomputed from the runs: the table follows today's rules
            results = json.loads((pathlib.Path(args.replot) / "results.json").read_text())
            results["summary"] = summarize(results["runs"], results["recipes"])
            results["floors"] = floors(results["summary"])
            command = results["command"]
        paths = write_results(results, args.out if args.merge else args.replot, command, plots=not args.no_plots)
        print(console_table(results["summary"]))
        print("wrote " + ", ".join(map(str, paths.values())))
        return 0
    torch.set_num_threads(args.threads)
    try:
        seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2,3,4")).split(",")]
        blocks, shortcut = MODELS[args.model] if args.model else (None, None)
        cfg = config_for(args.dataset, quick=args.quick, iterations=args.iterations, blocks=blocks, shortcut=shortcut,
                         stem=args.stem, execution=args.execution)
        data = load(args.dataset, args.data)
        if args.quick and args.dataset in QUICK_SLICE:
            data = data.head(*QUICK_SLICE[args.dataset])
    except (FracpassError, ValueError) as e:
        print(f"fractrain_mnist: error: {e}", file=sys.stderr)
        return 2
    recipes = args.recipes.split(",") if args.recipes else ()
    print(data.describe())
    start = time.perf_counter()
    command = "python examples/fractrain_mnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run_comparison(data, cfg, seeds, recipes, progress=not args.no_progress, run_dir=args.out,
                             command=command.strip())
    paths = write_results(results, args.out, command.strip(), plots=not args.no_plots)
    print(console_table(results["summary"]))
    for name, f in results["floors"].items():
        print(f"floor {name}: saving {100 * f['saving']:.1f}% at {f['accuracy_pp']:+.2f} pp: "
              f"{'met' if f['met'] else 'NOT met'}")
    print(f"{time.perf_counter() - start:.0f} s; wrote " + ", ".join(map(str, paths.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
