"""The comparison's plots (matplotlib, PNG, no display needed).

* ``precision.png``: bits per iteration for each recipe (the first seed), stage switches marked;
  gated recipes show the batch's mean chosen activation and gradient bits.
* ``loss.png``: training loss (moving average, mean over seeds).
* ``bitops_accuracy.png``: test accuracy against cumulative training BitOPs, both accountings
  (mean over seeds at each evaluation).
* ``tradeoff.png``: each recipe's BitOPs saving against static 8/8/8 and its accuracy difference to it, with
  the range of the per-seed savings and the paired 95 % interval as error bars, the floors drawn, and the
  paper's CIFAR-10 ResNet-38/74 results marked for reference (``fracpass.experiments.paper``), both
  accountings (the paper's points in its own);
* ``gates_<recipe>.png``: for gated recipes, the option mix per gated unit over training (the first
  seed), stage switches marked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

__all__ = ["write_plots", "tradeoff_points"]

SMOOTH = 20  # iterations in the loss's moving average


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _first(results, recipe):
    return next(r for r in results["runs"] if r["recipe"] == recipe)


def _bits(results, run) -> Dict[str, np.ndarray]:
    """Forward (activation) and gradient bits per iteration of one run."""
    from fracpass.experiments.recipes import LADDER, plan_for, config_for

    recipe, stages = run["recipe"], np.array(run["stages"])
    if recipe == "fp32":
        return {"a": np.full(len(stages), 32.0), "g": np.full(len(stages), 32.0)}
    if "gates" in run:
        options = np.array(run["gates"]["options"], dtype=float)  # (K, 2)
        counts = np.array(run["gates"]["counts"], dtype=float)  # (T, U, K)
        share = counts.sum(1) / counts.sum((1, 2))[:, None]
        return {"a": share @ options[:, 0], "g": share @ options[:, 1]}
    bits = {"static-8/8/8": (8, 8), "static-6/8": (6, 8), "static-4/6": (4, 6)}
    if recipe in bits:
        a, g = bits[recipe]
        return {"a": np.full(len(stages), float(a)), "g": np.full(len(stages), float(g))}
    return {"a": np.array(LADDER[0], dtype=float)[stages], "g": np.array(LADDER[1], dtype=float)[stages]}


def write_plots(results: Dict[str, Any], out_dir) -> Dict[str, Path]:
    from fracpass.experiments.recipes import BY_NAME

    plt = _plt()
    out_dir = Path(out_dir)
    recipes = results["recipes"]
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(recipes)}
    paths: Dict[str, Path] = {}
    title = results["dataset"].split(":")[0]

    # precision over iterations
    fig, axes = plt.subplots(len(recipes), 1, figsize=(9, 1.5 * len(recipes) + 0.8), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], recipes):
        run = _first(results, name)
        bits = _bits(results, run)
        it = np.arange(1, len(bits["a"]) + 1)
        ax.plot(it, bits["a"], color=colors[name], label="w/a bits" if "gates" not in run else "mean chosen a bits")
        ax.plot(it, bits["g"], color=colors[name], ls="--", alpha=0.7, label="g bits" if "gates" not in run else "mean chosen g bits")
        for s in run["switches"]:
            ax.axvline(s[0], color="k", lw=0.8, ls=":")
        ax.set_ylabel("bits")
        ax.set_title(f"{BY_NAME[name].label} (seed {run['seed']})" + (": switches dotted" if run["switches"] else ""),
                     fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_yscale("log", base=2)
        ax.set_yticks([3, 4, 6, 8, 12, 16, 32])
        ax.get_yaxis().set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[-1, 0].set_xlabel("iteration")
    fig.suptitle(f"{title}: precision over training", fontsize=11)
    fig.tight_layout()
    paths["precision"] = out_dir / "precision.png"
    fig.savefig(paths["precision"], dpi=110)
    plt.close(fig)

    # training loss
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in recipes:
        losses = np.mean([r["losses"] for r in results["runs"] if r["recipe"] == name], axis=0)
        k = min(SMOOTH, len(losses))
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(losses) + 1), smooth, color=colors[name], label=BY_NAME[name].label)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"training loss ({SMOOTH}-iteration mean{_over_seeds(results)})")
    ax.legend(fontsize=8)
    ax.set_title(f"{title}: training loss")
    fig.tight_layout()
    paths["loss"] = out_dir / "loss.png"
    fig.savefig(paths["loss"], dpi=110)
    plt.close(fig)

    # cumulative BitOPs vs accuracy
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, label in zip(axes, ("paper", "whole"), ("paper's accounting (quantized ops)", "whole model (+ FP32 ops, gates)")):
        for name in recipes:
            rs = [r for r in results["runs"] if r["recipe"] == name]
            x = np.mean([r["cumulative_at_evals"][key] for r in rs], axis=0)
            y = 100 * np.mean([[a for _, a in r["evals"]] for r in rs], axis=0)
            ax.plot(x, y, marker=".", color=colors[name], label=BY_NAME[name].label)
        ax.set_xscale("log")
        ax.set_xlabel(f"cumulative training BitOPs, {label}")
        ax.grid(alpha=0.3)
    over = _over_seeds(results)
    axes[0].set_ylabel("test accuracy %" + (f" ({over[2:]})" if over else ""))
    # every evaluation point in view, the first ones (near chance) included
    lo = min(100 * np.mean([[a for _, a in r["evals"]] for r in results["runs"] if r["recipe"] == n], axis=0).min()
             for n in recipes)
    axes[0].set_ylim(max(0.0, lo - 5), 100)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}: accuracy against training cost")
    fig.tight_layout()
    paths["bitops_accuracy"] = out_dir / "bitops_accuracy.png"
    fig.savefig(paths["bitops_accuracy"], dpi=110)
    plt.close(fig)

    paths["tradeoff"] = _tradeoff(plt, results, colors, title, out_dir / "tradeoff.png")

    # option mix per gated unit
    for name in recipes:
        run = _first(results, name)
        if "gates" not in run:
            continue
        counts = np.array(run["gates"]["counts"], dtype=float)  # (T, U, K)
        units, options = run["gates"]["units"], run["gates"]["options"]
        bins = max(1, min(60, len(counts) // 5))
        edges = np.linspace(0, len(counts), bins + 1).astype(int)
        fig, axes = plt.subplots(len(units), 1, figsize=(9, 1.3 * len(units) + 1.2), sharex=True, squeeze=False)
        for u, ax in enumerate(axes[:, 0]):
            mix = np.stack([counts[a:b, u].sum(0) / max(1.0, counts[a:b, u].sum()) for a, b in zip(edges[:-1], edges[1:])], 1)
            im = ax.imshow(mix, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                           extent=(0, len(counts), len(options) - 0.5, -0.5))
            ax.set_yticks(range(len(options)))
            ax.set_yticklabels([f"a{a}/g{g}" if a else "skip" for a, g in options], fontsize=7)
            ax.set_title(f"unit {units[u]}", fontsize=9, loc="left")
            for s in run["switches"]:
                ax.axvline(s[0], color="w", lw=1, ls=":")
        axes[-1, 0].set_xlabel("iteration")
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="share of samples", shrink=0.8)
        fig.suptitle(f"{title}: {BY_NAME[name].label}, option mix per gated unit (seed {run['seed']}; switches dotted)",
                     fontsize=10)
        key = f"gates_{name}"
        paths[key] = out_dir / f"gates_{name.replace('/', '-')}.png"
        fig.savefig(paths[key], dpi=110)
        plt.close(fig)
    return paths



def _over_seeds(results) -> str:
    """', mean over N seeds' for several seeds, nothing for one (a mean of one run is that run)."""
    n = len(results.get("seeds", ())) or len({r.get("seed") for r in results["runs"]})
    return f", mean over {n} seeds" if n > 1 else ""


def tradeoff_points(summary: Dict[str, Any], key: str = "paper") -> List[Dict[str, Any]]:
    """The trade-off plot's points in accounting ``key``: per recipe, its saving of static 8/8/8's training
    BitOPs (a ratio of totals over the seeds), the range of each seed's saving against 8/8/8's run of the
    same seed, its accuracy difference to 8/8/8 in pp and the paired 95 % interval of it (None below two
    paired seeds). FP32, at 16 times 8/8/8's cost in the paper's accounting, has no point."""
    points = []
    for name, e in summary.items():
        if name.startswith("_") or name == "fp32" or "saving_vs_static8" not in e:
            continue
        saving = e["saving_vs_static8"]
        per_seed = saving.get(f"{key}_per_seed") or [saving[key]]
        ci = e.get("accuracy_vs_static8_ci95_pp")
        points.append({"recipe": name, "label": e["label"], "saving": saving[key],
                       "saving_range": (min(per_seed), max(per_seed)), "accuracy_pp": e["accuracy_vs_static8_pp"],
                       "ci95_pp": tuple(ci) if ci is not None else None})
    return points


def _tradeoff(plt, results, colors, title, path: Path) -> Path:
    from fracpass.experiments.compare import FLOOR_ACCURACY_PP, FLOOR_SAVING
    from fracpass.experiments.paper import versus_sbm

    summary = results["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, key, label in zip(axes, ("paper", "whole"), ("paper's accounting (quantized ops)",
                                                          "whole model (+ FP32 ops, gates)")):
        for p in tradeoff_points(summary, key):
            x, (lo, hi) = 100 * p["saving"], p["saving_range"]
            y, ci = p["accuracy_pp"], p["ci95_pp"]
            yerr = [[y - ci[0]], [ci[1] - y]] if ci is not None and p["recipe"] != "static-8/8/8" else None
            ax.errorbar([x], [y], xerr=[[x - 100 * lo], [100 * hi - x]], yerr=yerr, fmt="o", capsize=4,
                        color=colors[p["recipe"]], label=p["label"] if key == "paper" else None)
            ax.annotate(p["recipe"], (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7,
                        color=colors[p["recipe"]])
        if key == "paper":
            for q in versus_sbm():
                ax.scatter([100 * q.saving], [q.accuracy_pp], marker="*" if q.method == "FracTrain" else "D",
                           s=120 if q.method == "FracTrain" else 50, facecolors="none",
                           edgecolors="0.55" if q.model == "ResNet-38" else "0.15",
                           label=f"paper, {q.model} CIFAR-10: {q.method}")
                ax.annotate(f"paper {q.model[-2:]} {q.method}", (100 * q.saving, q.accuracy_pp), xytext=(5, -9),
                            textcoords="offset points", fontsize=6, color="0.4")
            ax.axvline(100 * FLOOR_SAVING, color="tab:red", lw=0.8, ls="--", label=f"PFQ's floor: {FLOOR_SAVING:.0%} saving")
        ax.axhline(-FLOOR_ACCURACY_PP, color="tab:red", lw=0.8, ls=":",
                   label=f"accuracy floor: -{FLOOR_ACCURACY_PP} pp" if key == "paper" else None)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel(f"training BitOPs saved vs static 8/8/8, %: {label}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy - static 8/8/8's, pp")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(f"{title}: saving against accuracy (bars: the seeds' range of savings, the paired 95 % interval "
                 "of the accuracy difference; FP32 off the plot)", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
