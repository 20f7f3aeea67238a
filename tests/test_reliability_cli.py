"""Bad input at the command line and at the file boundary: one line `fracpass <cmd>: error: ...`,
exit code 2, no traceback (issue 14, items 5 and 6).

The CLI runs in-process through ``fracpass.cli.main`` (fast); one test runs it as a user would,
in a subprocess, for the exit code and the shape of stderr.
"""
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import fracpass
from conftest import ROOT
from fracpass.cli import main
from fracpass.errors import ExportError, PlanError

NOT_UTF8 = b'name = "caf\xe9"\n'  # Latin-1 text: byte 0xe9 at offset 11 is not UTF-8
MODEL = ["--model", "examples.models:resnet20"]


@pytest.fixture
def latin1_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(NOT_UTF8)
    return path


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``fracpass *argv`` run in this process."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, command, message):
    assert code == 2, err
    assert err.startswith(f"fracpass {command}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


# --- read_toml: a file that is not UTF-8 ---------------------------------------------------------

def test_plan_file_not_utf8_names_file_and_offset(latin1_file):
    with pytest.raises(PlanError, match=rf"{re.escape(str(latin1_file))}: not UTF-8 text: byte 0xe9 at offset 11.*save it as UTF-8"):
        fracpass.Plan.load(latin1_file)


def test_cli_plan_not_utf8(capsys, latin1_file):
    code, _, err = run_cli(capsys, "transform", *MODEL, "--plan", str(latin1_file))
    assert_one_line_error(code, err, "transform", f"{latin1_file}: not UTF-8 text: byte 0xe9 at offset 11")


def test_cli_target_not_utf8(capsys, latin1_file):
    code, _, err = run_cli(capsys, "cost", *MODEL, "--input-shape", "1,3,32,32", "--target", str(latin1_file))
    assert_one_line_error(code, err, "cost", f"{latin1_file}: not UTF-8 text: byte 0xe9 at offset 11")


# --- output files into a missing directory -------------------------------------------------------

def test_cli_plan_output_into_missing_directory(capsys, tmp_path):
    out = tmp_path / "nodir" / "stages.toml"
    code, _, err = run_cli(capsys, "plan", *MODEL, "-o", str(out))
    assert_one_line_error(code, err, "plan", f"-o {out}: directory {out.parent} does not exist; create it first")


def test_cli_export_output_into_missing_directory(capsys, tmp_path):
    out = tmp_path / "nodir" / "m.onnx"
    code, _, err = run_cli(capsys, "export", *MODEL, "--input-shape", "1,3,32,32", "-o", str(out))
    assert_one_line_error(code, err, "export", f"-o {out}: directory {out.parent} does not exist; create it first")


def test_cli_output_is_a_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "plan", *MODEL, "-o", str(tmp_path))
    assert_one_line_error(code, err, "plan", f"-o {tmp_path}: is a directory; give a file name")


def test_export_onnx_checks_the_directory_before_exporting(tmp_path, monkeypatch):
    import fracpass.export as export

    qmodel = fracpass.transform(nn.Sequential(nn.Linear(4, 2)), fracpass.Plan.static(),
                                example_inputs=(torch.randn(2, 4),))
    monkeypatch.setattr(export, "_torch_export", lambda *a, **k: pytest.fail("exported before checking the path"))
    out = tmp_path / "nodir" / "m.onnx"
    with pytest.raises(ExportError, match=rf"export_onnx: cannot write {re.escape(str(out))}: directory {re.escape(str(out.parent))} does not exist"):
        fracpass.export_onnx(qmodel, out)
    with pytest.raises(ExportError, match=rf"export_onnx: cannot write {re.escape(str(tmp_path))}: it is a directory"):
        fracpass.export_onnx(qmodel, tmp_path)


# --- malformed option values ---------------------------------------------------------------------

def test_cli_steps_per_stage_not_integers(capsys):
    code, _, err = run_cli(capsys, "cost", *MODEL, "--input-shape", "1,3,32,32", "--steps-per-stage", "10,x")
    assert_one_line_error(code, err, "cost", "--steps-per-stage '10,x': expected comma-separated integers")


def test_cli_export_input_of_wrong_rank(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", *MODEL, "--input-shape", "1,3,32", "-o", str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "export", "--input-shape 1,3,32: the model cannot run on input 0 of shape (1, 3, 32)")
    assert "its first layer conv1 (Conv2d) takes (N, 3, H, W)" in err
    assert "expected input[1, 1, 3, 32] to have 3 channels" in err  # torch's own words, for the details
    assert not (tmp_path / "m.onnx").exists()


# --- as a user runs it ---------------------------------------------------------------------------

def test_subprocess_error_is_one_line_with_exit_code_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fracpass", "cost", *MODEL, "--input-shape", "1,3,32,32",
                           "--steps-per-stage", "10,x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "fracpass cost: error: --steps-per-stage '10,x': expected comma-separated integers, e.g. 8190,8190,7800,40000"]


# --- issue 31: options checked before any work, messages that name the flag ----------------------

@pytest.fixture
def no_training(monkeypatch):
    """The demo's training, replaced by a failure: a bad option must be refused before it starts."""
    import fracpass.experiments.demo as demo

    monkeypatch.setattr(demo, "run", lambda args, out=print: pytest.fail("the demo trained before checking its options"))


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_cli_demo_threads_below_one(capsys, tmp_path, no_training, threads):
    code, _, err = run_cli(capsys, "demo", "--threads", threads, "--out", str(tmp_path / "demo"))
    assert_one_line_error(code, err, "demo", f"--threads {threads}: give a positive number of threads, e.g. --threads 1")


def test_cli_demo_out_is_an_existing_file(capsys, tmp_path, no_training):
    results = tmp_path / "results.json"
    results.write_text("kept\n")
    code, _, err = run_cli(capsys, "demo", "--quick", "--out", str(results))
    assert_one_line_error(code, err, "demo", f"--out {results}: is a file; the demo writes a folder of results there, "
                                             "so give a folder (e.g. --out fracpass-demo) or move the file away")
    code, _, err = run_cli(capsys, "demo", "--quick", "--out", str(results / "demo"))
    assert_one_line_error(code, err, "demo", f"--out {results / 'demo'}: lies under {results}, which is a file")
    assert results.read_text() == "kept\n"


def test_cli_demo_out_accepts_an_existing_or_new_folder(capsys, tmp_path, monkeypatch):
    import fracpass.experiments.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run", lambda args, out=print: seen.append(args.out) or 0)
    monkeypatch.chdir(tmp_path)
    for out in (str(tmp_path), str(tmp_path / "new" / "nested"), "relative"):
        code, _, err = run_cli(capsys, "demo", "--out", out)
        assert code == 0 and err == "", err
    assert seen == [str(tmp_path), str(tmp_path / "new" / "nested"), "relative"]


def test_cli_model_without_factory_suggests_a_spec_that_imports_outside_the_repository(capsys, tmp_path, monkeypatch):
    from fracpass.cli import load_model

    code, _, err = run_cli(capsys, "cost", "--model", "fracpass.models", "--input-shape", "1,3,32,32")
    assert_one_line_error(code, err, "cost", "--model 'fracpass.models': expected 'package.module:factory', "
                                             "e.g. 'fracpass.models:resnet20'")
    suggested = re.search(r"e\.g\. '([^']+)'", err).group(1)
    assert suggested.split(".")[0] == "fracpass"  # ships in the wheel, unlike examples/
    monkeypatch.chdir(tmp_path)
    assert isinstance(load_model(suggested), nn.Module)


@pytest.mark.parametrize("calibrate", ["0", "-1"])
def test_cli_export_calibrate_below_one_names_the_flag(capsys, tmp_path, monkeypatch, calibrate):
    monkeypatch.setattr(fracpass, "transform", lambda *a, **k: pytest.fail("transformed before checking --calibrate"))
    out = tmp_path / "m.onnx"
    code, _, err = run_cli(capsys, "export", *MODEL, "--input-shape", "1,3,32,32", "--calibrate", calibrate, "-o", str(out))
    assert_one_line_error(code, err, "export", f"--calibrate {calibrate}: the exported activation quantizers take their "
                                               "ranges from calibration batches; give at least 1, e.g. --calibrate 4")
    assert not out.exists()


@pytest.mark.parametrize("command", ["plan", "check"])
def test_cli_stage_is_refused_where_it_is_not_used(capsys, tmp_path, monkeypatch, command):
    monkeypatch.setattr(fracpass, "transform", lambda *a, **k: pytest.fail(f"{command} ran with --stage"))
    extra = ["--golden", str(tmp_path)] if command == "check" else []
    with pytest.raises(SystemExit) as exit_:
        main([command, *MODEL, *extra, "--stage", "1"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --stage 1" in capsys.readouterr().err


def test_cli_bench_stage_is_short_for_stages():
    from fracpass.cli import build_parser

    # argparse takes an unambiguous prefix of an option: bench's --stage 1 times stage 1, as --stages 1 does
    assert build_parser().parse_args(["bench", *MODEL, "--stage", "1"]).stages == "1"
    assert not hasattr(build_parser().parse_args(["bench", *MODEL]), "stage")


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"fracpass {fracpass.__version__}\n"
