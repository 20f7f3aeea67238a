"""The comparison's table and results files: ``results.md`` (the table, the floors, energy and
latency per hardware profile, the gates' option mix per stage), ``results.json`` and the plots.

It reads a summary (``fracpass.experiments.compare.summarize``); nothing here computes a result.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from fracpass.experiments.recipes import Config, describe_setup

__all__ = ["HEAD", "COMPACT", "markdown_table", "console_table", "profiles_table", "gates_table", "write_results"]

BASELINE = "static-8/8/8"


def _pm(mean: float, std: float, scale: float = 100, digits: int = 2) -> str:
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _rows(summary: Dict[str, Any], target: str = "bitfusion") -> List[List[str]]:
    rows = []
    for name, e in summary.items():
        if name.startswith("_"):
            continue
        sav = e.get("saving_vs_static8", {}) if name != "fp32" else {}  # FP32 is the 1x reference, not a saving
        t = e["total_mean"]
        switches = e["switch_iterations_per_seed"]
        ci = e.get("accuracy_vs_static8_ci95_pp")
        rows.append([
            e["label"] + (", stem at stage bits" if e.get("stem") == "stage bits" else ""),
            _pm(e["accuracy_mean"], e["accuracy_std"]),
            f"{e.get('accuracy_vs_static8_pp', 0):+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci and name != BASELINE
                                                            else ""),
            "; ".join("/".join(map(str, s)) for s in switches) if any(switches) else "-",
            f"{t['paper_bitops']:.3e}", f"{100 * e['relative_to_fp32']['paper']:.2f}%",
            f"{100 * sav['paper']:.1f}%" if sav else "-",
            f"{100 * sav['paper_up_to_best']:.1f}%" if "paper_up_to_best" in sav else "-",
            f"{t['whole_bitops']:.3e}", f"{100 * e['relative_to_fp32']['whole']:.2f}%",
            f"{100 * sav['whole']:.1f}%" if sav else "-",
            f"{t.get('energy_j:' + target, float('nan')):.3e}", f"{t.get('latency_s:' + target, float('nan')):.3e}",
            f"{e['wall_s_mean']:.1f}",
        ])
    return rows


HEAD = ["recipe", "test acc. % (mean ± std)", "Δ acc. vs 8/8/8 (pp) [paired 95 % CI]", "switch iterations (per seed)",
        "training BitOPs (paper)", "paper: vs FP32", "paper: saving vs 8/8/8", "paper: saving to best val. acc.",
        "BitOPs (whole model)", "whole: vs FP32", "whole: saving vs 8/8/8", "energy J (bitfusion)",
        "latency s (bitfusion)", "wall s / run"]


COMPACT = (0, 1, 2, 5, 6, 7, 9, 10, 11, 12, 13)  # no switch lists or absolute BitOPs (for the README)


def _head(summary: Dict[str, Any]) -> List[str]:
    """HEAD, its accuracy column naming what the accuracy is (selected on validation, or final)."""
    entry = next((e for n, e in summary.items() if not n.startswith("_")), {})
    selected = entry.get("accuracy_basis") == "test at best validation"
    return [HEAD[0], "test acc. % at best val. (mean ± std)" if selected else "final test acc. % (mean ± std)"] + HEAD[2:]


def markdown_table(summary: Dict[str, Any], columns: Sequence[int] = tuple(range(len(HEAD)))) -> str:
    head = [_head(summary)[i] for i in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r[i] for i in columns) + " |" for r in _rows(summary)]
    return "\n".join(lines)


def console_table(summary: Dict[str, Any], columns: Sequence[int] = (0, 1, 2, 4, 5, 6, 8, 10, 11, 12)) -> str:
    rows = [[_head(summary)[i] for i in columns]] + [[r[i] for i in columns] for r in _rows(summary)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def profiles_table(summary: Dict[str, Any]) -> str:
    """Energy and latency of the whole training run on every profile (means over seeds)."""
    names = [k for k in next(e for n, e in summary.items() if not n.startswith("_"))["total_mean"]
             if k.startswith("latency_s:")]
    targets = [k.split(":", 1)[1] for k in names]
    head = ["recipe"] + [f"{t} energy J / latency s" for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(targets) + "|"]
    for name, e in summary.items():
        if name.startswith("_"):
            continue
        t = e["total_mean"]
        lines.append("| " + " | ".join([e["label"]] + [f"{t['energy_j:' + p]:.3e} / {t['latency_s:' + p]:.3e}"
                                                         for p in targets]) + " |")
    return "\n".join(lines)


def gates_table(summary: Dict[str, Any]) -> str:
    """Option mix per stage and unit, and the controller's mean cost against its target."""
    lines = []
    for name, e in summary.items():
        if name.startswith("_") or "gates" not in e:
            continue
        g = e["gates"]
        opts = [f"a{a}/g{b}" if a else "skip" for a, b in g["options"]]
        lines += [f"**{e['label']}**: option mix per stage (share of samples over all seeds' batches); the "
                  "controller's mean batch cost vs its target (whole-model units, gates left out); paper's target",
                  "", "| stage | unit | " + " | ".join(opts) + " | controller cost vs target | paper target |",
                  "|---|---|" + "---:|" * (len(opts) + 2)]
        for st in g["per_stage"]:
            if not st.get("batches"):
                lines.append(f"| {st['stage']} | (never reached) |" + " - |" * (len(opts) + 2))
                continue
            for i, (u, mix) in enumerate(st["mix"].items()):
                ctrl = (f"{st['controller_cost_mean']:.3f}% vs {st['controller_target']:.3f}% (cheapest "
                        f"{st['controller_cheapest']:.3f}%)") if i == 0 else ""
                lines.append(f"| {st['stage'] if i == 0 else ''} | {u} | " + " | ".join(f"{100 * p:.0f}%" for p in mix)
                             + f" | {ctrl} | {st['paper_target'] if i == 0 else ''} |")
        lines.append("")
    return "\n".join(lines)


_CONFIG_FIELDS = set(Config.__dataclass_fields__)


def write_results(results: Dict[str, Any], out_dir, command: str, plots: bool = True) -> Dict[str, Path]:
    """``<out>/results.json`` (summary, floors, every run's record), ``<out>/results.md`` and the plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results, command=command)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(results))  # compact: every run's per-iteration record is in it
    summary = results["summary"]
    fl = results.get("floors", {})
    floor_lines = []
    for name, f in fl.items():
        extra = f" (PFQ saved {100 * f['pfq_saving']:.1f}%)" if "pfq_saving" in f else ""
        ci = f.get("accuracy_ci95_pp")
        interval = f" (paired 95 % CI {ci[0]:+.2f} .. {ci[1]:+.2f} pp)" if ci else ""
        floor_lines.append(f"- {name}: saves {100 * f['saving']:.1f}% of static 8/8/8's training BitOPs (paper's "
                           f"accounting){extra} at {f['accuracy_pp']:+.2f} pp{interval}: floor "
                           f"{'met' if f['met'] else 'NOT met'}"
                           + (f" (by the mean difference alone, issue 12's rule: {'met' if f['met_by_mean'] else 'NOT met'})"
                              if "met_by_mean" in f and f["met_by_mean"] != f["met"] else ""))
    cfg = Config(**results["config"]) if set(results["config"]) <= _CONFIG_FIELDS else None
    cfg_d = results["config"]
    first = next((e for n, e in summary.items() if not n.startswith("_")), {})
    basis = ("Accuracy: test accuracy at each run's iteration of best validation accuracy (the validation images are "
             "held out of training; the test set selects nothing); final test accuracy per recipe in results.json."
             if first.get("accuracy_basis") == "test at best validation" else
             "Accuracy: final test accuracy (this data set has no validation split, so no iteration is selected and "
             "there is no saving up to a best iteration).")
    setup = describe_setup(cfg) if cfg is not None else f"ResNet-{6 * cfg_d['blocks'] + 2} width {cfg_d['width']}"
    text = [f"# {results['dataset']}", "",
            f"`{command}`: {_count(len(results['seeds']), 'seed')} ({', '.join(map(str, results['seeds']))}), "
            f"{cfg_d['iterations']} iterations of batch {cfg_d['batch_size']}, SGD lr {cfg_d['lr']} "
            f"({cfg_d.get('lr_schedule', 'cosine')}) momentum {cfg_d['momentum']} wd {cfg_d['weight_decay']}, {setup}, "
            f"execution {cfg_d.get('execution', 'simulate')}; torch {results['environment']['torch']}, "
            f"{results['environment']['threads']} thread(s); {results['wall_s']:.0f} s in all.", "", basis, "",
            markdown_table(summary), "",
            *(["Floors (paper's accounting, whole runs; accuracy difference paired by seed):", *floor_lines, ""]
              if floor_lines else []),
            paper_line(), "",
            "Energy and latency of the whole training run per hardware profile (whole model):", "",
            profiles_table(summary), "", gates_table(summary)]
    paths["markdown"].write_text("\n".join(text) + "\n")
    if plots:
        from fracpass.experiments.plots import write_plots

        paths.update(write_plots(results, out_dir))
    return paths


def paper_line() -> str:
    """The paper's CIFAR-10 points that tradeoff.png marks, in words, with their source."""
    from fracpass.experiments.paper import SOURCE, versus_sbm

    points = "; ".join(f"{q.model} {q.method} saves {100 * q.saving:.1f}% of SBM's training cost at {q.accuracy_pp:+.2f} pp"
                       for q in versus_sbm())
    return f"For reference (marked in tradeoff.png), the paper on CIFAR-10, static 8-bit (SBM) as the baseline: {points} ({SOURCE})."


def _count(n: int, noun: str) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
