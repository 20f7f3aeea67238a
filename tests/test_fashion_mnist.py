"""Issue 30's machinery: the Fashion-MNIST loader, its validation split, selection on validation,
FracTrain's ResNet-20 with projection shortcuts and the stage-bits stem, and ``--quick`` on a fixture.
Never a run's accuracy: the long runs' results belong to docs/results/fashion-mnist."""
import dataclasses
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import fracpass
from conftest import ROOT
from fracpass.errors import FracpassError
from fracpass.experiments import data as datasets
from fracpass.experiments import fashion_mnist, runner
from fracpass.experiments.accounting import PAPER, Accounting
from fracpass.experiments.compare import summarize
from fracpass.experiments.model import SmallResNet
from fracpass.experiments.recipes import LADDER, RECIPES, config_for
from fracpass.experiments.runner import build, select_best, train_run

N_TRAIN, N_TEST = 1200, 200  # 100 validation images (the full set's share, 1/12)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _images(n: int, offset: int) -> np.ndarray:
    """n distinct 28x28 images: image i's first three pixels spell offset + i, so every image (and
    which file and index it came from) can be told from its pixels after standardisation."""
    g = np.random.default_rng(offset)
    x = g.integers(0, 256, size=(n, 28, 28), dtype=np.int64)
    ids = np.arange(n) + offset
    x[:, 0, 0], x[:, 0, 1], x[:, 0, 2] = ids // 65536, ids // 256 % 256, ids % 256
    return x.astype(np.uint8)


def write_fixture(folder, compress: bool):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": _images(N_TRAIN, 0), "train-labels-idx1-ubyte": np.arange(N_TRAIN) % 10,
              "t10k-images-idx3-ubyte": _images(N_TEST, 100000), "t10k-labels-idx1-ubyte": np.arange(N_TEST) % 10}
    for stem, array in arrays.items():
        raw = _idx(np.asarray(array))
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays


def _ids(x: torch.Tensor, mean: float, std: float) -> np.ndarray:
    """The ids _images wrote, read back from standardised images."""
    px = np.rint((x[:, 0, 0, :3].numpy() * std + mean) * 255).astype(np.int64)
    return px[:, 0] * 65536 + px[:, 1] * 256 + px[:, 2]


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    write_fixture(folder, compress=True)
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_loader_reads_idx_files_gzip_or_not(tmp_path, compress):
    arrays = write_fixture(tmp_path, compress)
    assert np.array_equal(fashion_mnist.read_idx(next(tmp_path.glob("t10k-images*"))), arrays["t10k-images-idx3-ubyte"])
    data = datasets.load("fashion-mnist", tmp_path)
    assert data.x_train.shape == (1100, 1, 28, 28) and data.x_val.shape == (100, 1, 28, 28)
    assert data.x_test.shape == (N_TEST, 1, 28, 28) and data.num_classes == 10 and data.in_channels == 1
    train_x = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    train_idx, val_idx = datasets.validation_split(N_TRAIN, arrays["train-labels-idx1-ubyte"])
    mean, std = train_x[train_idx].mean(), train_x[train_idx].std(ddof=1)
    np.testing.assert_allclose(data.x_train[:, 0].numpy(), (train_x[train_idx] - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(data.x_val[:, 0].numpy(), (train_x[val_idx] - mean) / std, rtol=1e-4, atol=1e-4)
    test_x = arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255
    np.testing.assert_allclose(data.x_test[:, 0].numpy(), (test_x - mean) / std, rtol=1e-4, atol=1e-4)
    assert data.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.y_val.tolist() == arrays["train-labels-idx1-ubyte"][val_idx].tolist()
    assert "100 validation" in data.describe()


def test_split_is_fixed_stratified_and_disjoint(fixture_dir):
    a, b = datasets.load("fashion-mnist", fixture_dir), datasets.load("fashion-mnist", fixture_dir)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    torch.manual_seed(1234)  # a run's seed does not move the split
    c = datasets.load("fashion-mnist", fixture_dir)
    assert torch.equal(a.x_val, c.x_val)
    assert torch.bincount(a.y_val, minlength=10).tolist() == [10] * 10  # stratified: 1/12 of each class
    train_x = write_fixture(fixture_dir.parent / "again", True)["train-images-idx3-ubyte"].astype(np.float32) / 255
    train_idx, _ = datasets.validation_split(N_TRAIN, np.arange(N_TRAIN) % 10)
    mean, std = float(train_x[train_idx].mean()), float(train_x[train_idx].std(ddof=1))
    train, val, test = (set(_ids(x, mean, std).tolist()) for x in (a.x_train, a.x_val, a.x_test))
    assert len(train) == 1100 and len(val) == 100 and len(test) == N_TEST
    assert not train & val and not val & test and not train & test
    assert val <= set(range(N_TRAIN)) and test <= set(range(100000, 100000 + N_TEST))


def test_full_split_holds_out_5000_stratified():
    """On the real labels where the Debian package is installed: 5,000 of 60,000, 500 per class."""
    path = fashion_mnist.DEFAULT_FOLDER / "train-labels-idx1-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"Fashion-MNIST not installed ({fashion_mnist.INSTALL})")
    labels = fashion_mnist.read_idx(path).astype(np.int64)
    train, val = datasets.validation_split(len(labels), labels)
    again, val_again = datasets.validation_split(len(labels), labels)
    assert len(val) == 5000 and len(train) == 55000 and np.array_equal(val, val_again)
    assert not set(train.tolist()) & set(val.tolist())
    assert np.bincount(labels[val], minlength=10).tolist() == [500] * 10


def test_missing_or_damaged_files_say_how_to_fix(tmp_path):
    with pytest.raises(FracpassError, match=r"does not exist\. Install the data set with `apt-get update && "
                                            r"apt-get install -y dataset-fashion-mnist`"):
        datasets.load("fashion-mnist", tmp_path / "nope")
    write_fixture(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FracpassError, match=r"lacks t10k-labels-idx1-ubyte \(with or without \.gz\).*apt-get install"):
        datasets.load("fashion-mnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.arange(N_TEST) % 10)[:-5])
    with pytest.raises(FracpassError, match=r"truncated or damaged"):
        datasets.load("fashion-mnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(FracpassError, match=r"idx type 0x0d"):
        datasets.load("fashion-mnist", tmp_path)


def test_select_best_reads_validation_only():
    val = [[10, 0.80], [20, 0.85], [30, 0.85], [40, 0.70]]
    assert select_best(val) == 20  # the first of the ties
    assert select_best([]) is None and select_best(None) is None


def test_a_better_test_accuracy_elsewhere_does_not_move_the_best(fixture_dir, monkeypatch):
    """train_run's best iteration, the test accuracy reported for it and the cost up to it follow
    validation accuracy: the test set peaks at another iteration and changes nothing."""
    data = datasets.load("fashion-mnist", fixture_dir).head(256, 64, 64)
    cfg = config_for("fashion-mnist", quick=True, iterations=6, eval_every=2, blocks=1)
    scripted = {id(data.x_val): iter([0.50, 0.90, 0.70]), id(data.x_test): iter([0.99, 0.60, 0.95])}
    monkeypatch.setattr(runner, "evaluate", lambda model, x, y: next(scripted[id(x)]))
    record = train_run("static-8/8/8", cfg, data, 0, ("bitfusion",))
    assert record["selected_on"] == "validation"
    assert record["best_iteration"] == 4 and record["best_val_accuracy"] == 0.90 and record["test_at_best"] == 0.60
    assert record["evals"] == [[2, 0.99], [4, 0.60], [6, 0.95]] and record["final_accuracy"] == 0.95
    assert record["up_to_best"][PAPER] == pytest.approx(record["total"][PAPER] * 4 / 6, rel=1e-12)
    entry = summarize([record], ["static-8/8/8"])["static-8/8/8"]
    assert entry["accuracy_basis"] == "test at best validation" and entry["accuracy_mean"] == 0.60
    assert entry["best_iteration_per_seed"] == [4]


def test_resnet20_has_the_authors_projection_shortcuts():
    model = SmallResNet(1, 10, n=3, shortcut="proj")
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2
    shortcuts = [(n, m) for n, m in convs if ".shortcut." in n]
    assert [n for n, _ in shortcuts] == ["layers.3.shortcut.0", "layers.6.shortcut.0"]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for _, m in shortcuts] == \
        [(16, 32, (1, 1), (2, 2)), (32, 64, (1, 1), (2, 2))]
    assert isinstance(model.layers[3].shortcut[1], torch.nn.BatchNorm2d)
    assert [m.out_channels for n, m in convs if n.endswith("conv2")] == [16] * 3 + [32] * 3 + [64] * 3
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(FracpassError, match=r"shortcut='conv'\): use 'proj'"):
        SmallResNet(shortcut="conv")


def _ops(qmodel, example):
    return {op.module: op for op in fracpass.cost(qmodel, example_inputs=(example,)).ops}


def test_stage_bits_pfq_on_resnet20_costs_what_its_bits_say(fixture_dir):
    data = datasets.load("fashion-mnist", fixture_dir)
    cfg = config_for("fashion-mnist", quick=True)
    assert (cfg.blocks, cfg.shortcut, cfg.stem) == (3, "proj", "stage-bits")
    example = data.x_train[:cfg.batch_size]
    qmodel, plan, _ = build("pfq", cfg, data, 0)
    ops = _ops(qmodel, example)
    assert len(ops) == 22 and ops["fc"].excluded and not ops["conv1"].excluded
    for name, op in ops.items():
        if name != "fc":  # the stem and both projection shortcuts at the ladder's bits, stage by stage
            assert (op.w, op.a, op.g) == (LADDER[0], LADDER[0], LADDER[1]), name
    b = len(example)
    assert ops["conv1"].forward_macs == b * 28 * 28 * 16 * 9  # MACs from shapes, checked by hand
    assert ops["layers.3.shortcut.0"].forward_macs == b * 14 * 14 * 32 * 16
    assert ops["layers.6.shortcut.0"].forward_macs == b * 7 * 7 * 64 * 32
    # the stem's input is the data: no error backward, so its cost is (f*f + g*f) per MAC, not (f*f + 2 g*f)
    assert ops["conv1"].backward_macs[0] == 0 and all(op.backward_macs[0] > 0 for n, op in ops.items() if n != "conv1")
    acct = Accounting.from_model(qmodel, example, ("bitfusion",))
    relative = acct.stage[:, PAPER] / acct.fp32[PAPER]
    paper_ops = [op for op in ops.values() if op.module != "fc"]
    macs = lambda op: op.forward_macs + sum(op.backward_macs)
    expected = [sum(op.forward_macs * f * f + op.backward_macs[0] * g * f + op.backward_macs[1] * g * f for op in paper_ops)
                / (1024 * sum(macs(op) for op in paper_ops)) for f, g in zip(*LADDER)]
    assert relative.tolist() == pytest.approx(expected, rel=1e-12)
    # every op but the stem at the textbook (f*f + 2 g*f) / 3072: 45, 64, 132, 192
    assert relative.tolist() == pytest.approx([45 / 3072, 64 / 3072, 132 / 3072, 192 / 3072], rel=5e-4)
    assert relative[-1] == 0.0625
    # the paper's count now holds the stem: FP32's paper cost is every op but the classifier, at 32 bits
    every_but_fc = sum(m * bx * by for op in ops.values() if op.module != "fc" for _, m, bx, by, _ in op.products(None))
    fp32 = runner.accounting_for("fp32", SmallResNet(1, 10, 3, shortcut="proj"), cfg, data, ("bitfusion",))
    assert fp32.fp32[PAPER] == acct.fp32[PAPER] == pytest.approx(every_but_fc / len(example), rel=1e-12)
    assert fp32.stage[0, PAPER] == pytest.approx(acct.fp32[PAPER], rel=1e-12)
    static = Accounting.from_model(build("static-8/8/8", cfg, data, 0)[0], example, ("bitfusion",))
    assert static.stage[0, PAPER] / static.fp32[PAPER] == 0.0625


def test_fp32_stem_option_and_gated_recipes_keep_the_stem_fp32(fixture_dir):
    data = datasets.load("fashion-mnist", fixture_dir)
    example = data.x_train[:32]
    cfg = config_for("fashion-mnist", quick=True, stem="fp32")
    ops = _ops(build("pfq", cfg, data, 0)[0], example)
    assert ops["conv1"].excluded and ops["layers.3.shortcut.0"].w == LADDER[0]
    for stem in ("fp32", "stage-bits"):
        gated = _ops(build("fractrain", config_for("fashion-mnist", quick=True, stem=stem), data, 0)[0], example)
        assert gated["conv1"].excluded and gated["fc"].excluded
        for name in ("layers.3.shortcut.0", "layers.6.shortcut.0"):  # no gate covers them: the most precise option
            op = gated[name]
            assert not op.gated and set(op.w) == {4} and set(op.a) == {6} and set(op.g) == {12}, name
        assert gated["layers.4.conv1"].gated


def _quick(out, fixture_dir, *extra):
    done = subprocess.run([sys.executable, "examples/fractrain_mnist.py", "--dataset", "fashion-mnist", "--data",
                           str(fixture_dir), "--model", "resnet20-proj", "--quick", "--seeds", "0", "--out", str(out),
                           "--no-progress", "--no-plots", *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_quick_runs_every_recipe_writes_run_files_and_merges(fixture_dir, tmp_path):
    names = [r.name for r in RECIPES]
    stdout = _quick(tmp_path / "all", fixture_dir)
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    assert results["recipes"] == names and [r["recipe"] for r in results["runs"]] == names
    assert all(r["selected_on"] == "validation" and len(r["val_evals"]) == len(r["evals"]) for r in results["runs"])
    assert results["config"]["shortcut"] == "proj" and results["config"]["stem"] == "stage-bits"
    table = (tmp_path / "all" / "results.md").read_text()
    assert "1x1 conv + BN projection shortcuts" in table and "PFQ 3/4/6/8, g 6/6/8/8, stem at stage bits" in table
    assert "test acc. % at best val." in table
    # the authors' FracTrain targets start at 1.5 %, below the cheapest option: that stage alone is warned about
    warned = [line for line in stdout.splitlines() if "lies below the cheapest mix" in line]
    assert len(warned) == 1 and "stage 0's cost target" in warned[0], stdout
    assert sorted(p.name for p in (tmp_path / "all" / "runs").glob("*.json")) == \
        sorted(f"{n.replace('/', '-')}-seed0.json" for n in names)
    # started again on the same folder: every run is read back, none trained
    again = _quick(tmp_path / "all", fixture_dir)
    assert again.count("read from") == len(names)
    # two parts (e.g. two sessions) merged give the same summary
    _quick(tmp_path / "a", fixture_dir, "--recipes", "fp32,static-8/8/8,static-6/8,static-4/6")
    _quick(tmp_path / "b", fixture_dir, "--recipes", "pfq,dfq,fractrain")
    (tmp_path / "a" / "results.json").unlink()  # a part may be a folder of run files only
    merged = subprocess.run([sys.executable, "examples/fractrain_mnist.py", "--merge", str(tmp_path / "a"),
                             str(tmp_path / "b"), "--out", str(tmp_path / "merged"), "--no-plots"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]
    joined = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert joined["recipes"] == names
    for name in names:
        for key in ("accuracy_mean", "total_mean", "best_iteration_per_seed"):
            assert joined["summary"][name][key] == results["summary"][name][key], (name, key)


class _StopAfter:
    """A progress bar that stops the run (as a killed process would) after ``n`` iterations."""

    def __init__(self, n):
        self.n, self.done = n, 0

    def update(self, k):
        self.done += k
        if self.done >= self.n:
            raise KeyboardInterrupt

    def set_postfix_str(self, text):
        pass


_VARIES = ("wall_s", "resumed_at")  # what a resumed run records differently by design


@pytest.mark.parametrize("recipe", ["pfq", "fractrain", "fp32"])
def test_a_run_stopped_partway_goes_on_bit_for_bit(fixture_dir, tmp_path, recipe):
    """A run killed after iteration 7 goes on from its checkpoint at 6 and records exactly what an
    uninterrupted run records: losses, stage switches, gate choices, accuracies, costs."""
    data = datasets.load("fashion-mnist", fixture_dir).head(256, 64, 64)
    cfg = config_for("fashion-mnist", quick=True, iterations=12, eval_every=4, blocks=1)
    whole = train_run(recipe, cfg, data, 0, ("bitfusion",))
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_run(recipe, cfg, data, 0, ("bitfusion",), bar=_StopAfter(7), checkpoint=ckpt, checkpoint_every=3)
    assert ckpt.is_file() and torch.load(ckpt, weights_only=False)["iteration"] == 6
    resumed = train_run(recipe, cfg, data, 0, ("bitfusion",), checkpoint=ckpt, checkpoint_every=3)
    assert resumed["resumed_at"] == [6] and whole["resumed_at"] == []
    if recipe != "fp32":
        assert whole["switches"], "the quick plateau settings switch stages within 12 iterations"
    assert json.dumps({k: v for k, v in resumed.items() if k not in _VARIES}) == \
        json.dumps({k: v for k, v in whole.items() if k not in _VARIES})


def test_a_checkpoint_of_another_run_is_refused(fixture_dir, tmp_path):
    data = datasets.load("fashion-mnist", fixture_dir).head(256, 64, 64)
    cfg = config_for("fashion-mnist", quick=True, iterations=4, eval_every=2, blocks=1)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_run("static-8/8/8", cfg, data, 0, bar=_StopAfter(3), checkpoint=ckpt, checkpoint_every=2)
    with pytest.raises(FracpassError, match=r"a checkpoint of 'static-8/8/8' seed 0 .*not of 'static-8/8/8' seed 1.*delete it"):
        train_run("static-8/8/8", cfg, data, 1, checkpoint=ckpt)
    with pytest.raises(FracpassError, match=r"saved with other settings \{'lr': \(0\.1, 0\.05\)\}"):
        train_run("static-8/8/8", dataclasses.replace(cfg, lr=0.05), data, 0, checkpoint=ckpt)


def test_status_lists_finished_runs_and_how_far_unfinished_ones_got(fixture_dir, tmp_path, capsys):
    """``--status``: a finished run with its accuracy at the best validation point, an unfinished one with the
    iteration its checkpoint goes on from and its last evaluation, a damaged checkpoint named; nothing
    trained or changed."""
    from fracpass.experiments import runfiles

    data = datasets.load("fashion-mnist", fixture_dir).head(256, 64, 64)
    cfg = config_for("fashion-mnist", quick=True, iterations=4, eval_every=2, blocks=1)
    done = train_run("static-8/8/8", cfg, data, 0)
    runfiles.write_run(tmp_path, data.describe(), cfg.to_dict(), done)
    ckpt = runfiles.checkpoint_path(tmp_path, "pfq", 1)
    with pytest.raises(KeyboardInterrupt):
        train_run("pfq", cfg, data, 1, bar=_StopAfter(3), checkpoint=ckpt, checkpoint_every=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()}
    rows = {(r["recipe"], r["seed"]): r for r in runfiles.status(tmp_path)}
    assert set(rows) == {("static-8/8/8", 0), ("pfq", 1)}
    fin, part = rows["static-8/8/8", 0], rows["pfq", 1]
    assert fin["finished"] and fin["val"] == (done["best_iteration"], done["best_val_accuracy"])
    assert fin["test"] == done["test_at_best"]
    assert not part["finished"] and (part["iteration"], part["iterations"]) == (2, 4) and part["val"][0] == 2
    (tmp_path / "runs" / "dfq-seed0.ckpt").write_bytes(b"not a checkpoint")
    from examples.fractrain_mnist import main

    assert main(["--status", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path}:"
    assert out[1].startswith("dfq-seed0") and "unreadable" in out[1]
    assert "pfq" in out[2] and "at 2 / 4" in out[2] and "last evaluation: validation" in out[2]
    assert "static-8/8/8" in out[3] and "finished" in out[3] and "at best validation" in out[3]
    assert {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir() if p.name != "dfq-seed0.ckpt"} == before
    assert main(["--status", str(tmp_path / "nowhere"), str(tmp_path)]) == 2  # the good folder listed too
    captured = capsys.readouterr()
    assert "no runs/ folder" in captured.err and "static-8/8/8" in captured.out
