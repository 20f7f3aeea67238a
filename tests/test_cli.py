"""The fracpass command line. Two tests run it as a user would, in a subprocess (a command and ``--version``);
the others run the same ``main`` in this process (``cli_in_process``), without a 3 s interpreter start each.
tests/test_reliability_cli.py checks that a subprocess error is one line with exit code 2."""
import subprocess
import sys

import pytest

from conftest import ROOT, cli_in_process

PLAN = ROOT / "examples" / "plans" / "fractrain_cifar.toml"


def fracpass_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "fracpass", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_transform_prints_summary():
    done = fracpass_cli("transform", "--model", "examples.models:resnet20", "--plan", str(PLAN), "--stage", "2")
    assert done.returncode == 0, done.stderr
    assert "stage 2 of 4 (w/a/g = 6/6/8)" in done.stdout
    assert "excluded: stem kept at full precision" in done.stdout
    assert "22 compute ops: 20 quantized, 2 excluded; 60 quantizer modules" in done.stdout


def test_transform_export_path_with_token_input():
    done = cli_in_process("transform", "--model", "examples.models:transformer", "--input-shape", "2,16",
                        "--input-dtype", "int64", "--capture", "export")
    assert done.returncode == 0, done.stderr
    assert "captured with export" in done.stdout and "sdpa" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "examples.models"], r"expected 'package.module:factory'"),
    (["--model", "no_such_pkg.mod:f"], r"cannot import 'no_such_pkg.mod': ModuleNotFoundError"),
    (["--model", "examples.models:nope"], r"module 'examples.models' has no attribute 'nope'"),
    (["--model", "examples.models:__all__"], r"__all__ gave a list, not a torch.nn.Module"),
    (["--model", "examples.models:resnet20", "--plan", "missing.toml"], r"cannot read plan file missing.toml"),
    (["--model", "examples.models:resnet20", "--input-shape", "1,x"], r"expected comma-separated integers"),
    (["--model", "examples.models:transformer", "--plan", str(PLAN)], r"plan rule 0 \(match='conv1'\) matches no compute op"),
    (["--model", "examples.models:resnet20", "--stage", "9"], r"stage 9 is out of range"),
])
def test_errors_exit_2_with_one_message(args, message, tmp_path):
    import re

    done = cli_in_process("transform", *args)
    assert done.returncode == 2
    assert re.search(message, done.stderr), done.stderr
    assert done.stderr.startswith("fracpass transform: error: ") and "Traceback" not in done.stderr


def test_bad_toml_plan(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[stages]\n")
    done = cli_in_process("transform", "--model", "examples.models:resnet20", "--plan", str(bad))
    assert done.returncode == 2 and "not valid TOML" in done.stderr


def test_usage_error():
    done = cli_in_process("transform")
    assert done.returncode == 2 and "--model" in done.stderr


def test_cost_text_json_and_training_totals():
    import json

    done = cli_in_process("cost", "--model", "examples.models:resnet20", "--plan", str(PLAN), "--input-shape", "1,3,32,32",
                        "--target", "bitfusion", "--steps-per-stage", "10,10,10,10", "--batch-size", "128")
    assert done.returncode == 0, done.stderr
    assert "forward MACs per sample 40,813,184" in done.stdout
    assert "stage 3: BitOPs/sample" in done.stdout and "bitfusion:" in done.stdout
    assert "training: 40 steps (per stage [10, 10, 10, 10]), batch 128" in done.stdout
    done = cli_in_process("cost", "--model", "examples.models:resnet20", "--input-shape", "1,3,32,32", "--json")
    data = json.loads(done.stdout)
    assert data["forward_macs_per_sample"] == 40813184 and data["stages"][0]["relative_to_fp32"] == 1 / 16


@pytest.mark.parametrize("args, message", [
    (["--model", "examples.models:resnet20"], r"--input-shape is required"),
    (["--model", "examples.models:resnet20", "--input-shape", "1,3,32,32", "--target", "tpu"], r"unknown target 'tpu'"),
])
def test_cost_errors(args, message):
    import re

    done = cli_in_process("cost", *args)
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr


def test_plan_writes_a_stage_plan(tmp_path):
    out = tmp_path / "stages.toml"
    done = cli_in_process("plan", "--model", "examples.models:resnet20", "--plan", str(PLAN), "--input-shape", "1,3,32,32",
                        "--budget", "0.4", "--total-steps", "64000", "-o", str(out))
    assert done.returncode == 0, done.stderr
    import fracpass

    staged = fracpass.StagePlan.load(out)
    assert staged.budget.fraction == 0.4 and staged.budget.predicted <= 0.4 and len(staged.switch.boundaries()) == 3
    assert "budget: 40.0% of static asked" in done.stdout
    done = cli_in_process("plan", "--model", "examples.models:resnet20", "--budget", "0.4")
    assert done.returncode == 2 and "--budget and --total-steps go together" in done.stderr


GATED = ROOT / "examples" / "plans" / "fractrain_full_cifar.toml"


def test_gated_plan_through_transform_cost_and_plan(tmp_path):
    done = cli_in_process("transform", "--model", "examples.models:resnet20", "--plan", str(GATED),
                        "--input-shape", "2,3,32,32")
    assert done.returncode == 0, done.stderr
    assert "gates: 9 units (block)" in done.stdout and "unit layer3_2: layer3_2_conv1, layer3_2_conv2" in done.stdout
    done = cli_in_process("cost", "--model", "examples.models:resnet20", "--plan", str(GATED), "--input-shape", "2,3,32,32")
    assert done.returncode == 0, done.stderr
    assert "gated units: cost per option in % of FP32" in done.stdout and "from the example inputs" in done.stdout
    out = tmp_path / "stages.toml"
    done = cli_in_process("plan", "--model", "examples.models:resnet20", "--plan", str(GATED), "--input-shape", "2,3,32,32",
                        "-o", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert 'gated = "layer1_0"' in text and "targets = [1.5, 2.0, 2.5, 3.0]" in text
    onnx_path = tmp_path / "gated.onnx"
    done = cli_in_process("export", "--model", "examples.models:resnet20", "--plan", str(GATED), "--input-shape",
                        "1,3,32,32", "-o", str(onnx_path))
    assert done.returncode == 0, done.stderr
    import onnx

    assert "ArgMax" in {n.op_type for n in onnx.load(onnx_path).graph.node}


def test_gated_plan_needs_an_input_shape():
    done = cli_in_process("transform", "--model", "examples.models:resnet20", "--plan", str(GATED))
    assert done.returncode == 2
    assert "--input-shape is required for a plan with gates" in done.stderr


def _help(*command):
    done = cli_in_process(*command, "--help")
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())  # argparse wraps lines


def test_capture_has_a_help_text_and_stage_help_says_what_each_command_does_with_it():
    text = _help("transform")
    assert "--capture {auto,fx,export} how to capture the model: auto (torch.fx, falling back to non-strict " \
           "torch.export where fx fails), fx, or export (default auto)" in text
    assert "--stage STAGE stage whose bits the summary shows (default 0" in text
    assert "--stage STAGE stage of the per-op table (default 0); the BitOPs of every stage are printed" in _help("cost")
    assert "--stage STAGE stage to export (default -1, the last)" in _help("export")
    for command in ("plan", "check", "bench"):  # they cover every stage, or those of --stages: no --stage offered
        assert "--stage " not in _help(command), command  # bench's --stages stays


def test_check_format_has_a_help_text():
    assert "--format {text,json,github} text for people (default), json for scripts, or github: workflow commands " \
           "that annotate a GitHub Actions run" in _help("check")


def test_version_and_description_from_an_installed_fracpass(tmp_path):
    import fracpass

    done = fracpass_cli("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == f"fracpass {fracpass.__version__}\n", done.stderr
    text = _help()
    assert "The ``fracpass`` command line" not in text
    assert "Quantize a PyTorch model's training FracTrain-style, then cost, plan, check, export or time it; or run " \
           "the demo." in text


def test_cost_json_with_steps_per_stage_includes_the_training_totals():
    import json

    done = cli_in_process("cost", "--model", "examples.models:resnet20", "--plan", str(PLAN), "--input-shape", "1,3,32,32",
                        "--target", "bitfusion", "--steps-per-stage", "10,20,30,40", "--batch-size", "128", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    training = data["training"]
    per_sample = [s["bitops_per_sample"]["total"] for s in data["stages"]]
    assert training["steps_per_stage"] == [10, 20, 30, 40] and training["batch_size"] == 128
    assert training["bitops"] == pytest.approx(128 * sum(n * b for n, b in zip((10, 20, 30, 40), per_sample)), rel=1e-12)
    assert training["static_bitops"] == pytest.approx(128 * 100 * per_sample[-1], rel=1e-12)
    assert training["bitops_saving"] == pytest.approx(1 - training["bitops"] / training["static_bitops"], rel=1e-12)
    latency = [s["latency_s_per_step"] for s in data["stages"]]  # at the example batch of 1
    assert training["latency_s"] == pytest.approx(128 * sum(n * t for n, t in zip((10, 20, 30, 40), latency)), rel=1e-9)
    assert 0 < training["latency_saving"] < 1 and training["energy_j"] < training["static_energy_j"]
    done = cli_in_process("cost", "--model", "examples.models:resnet20", "--input-shape", "1,3,32,32", "--json")
    assert "training" not in json.loads(done.stdout)


def test_demo_is_a_subcommand_with_its_options():
    text = _help("demo")
    for option in ("--out", "--seed", "--quick", "--no-progress", "--threads"):
        assert option in text
