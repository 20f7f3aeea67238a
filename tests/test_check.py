"""CI checks of graph rewrites: canonical text, golden files, coverage, `fracpass check`."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import fracpass
from conftest import EXAMPLE_MODELS, ROOT, cli_in_process
from fracpass.testing import UPDATE_ENV, assert_graph_matches

PLAN = ROOT / "examples" / "plans" / "fractrain_cifar.toml"
GOLDEN = ROOT / "examples" / "ci" / "golden"


run = cli_in_process  # the check command in this process; the CI workflow's command runs in a shell below


TEXT_SNIPPET = ("import sys, torch\nsys.path.insert(0, {root!r})\nimport fracpass\nfrom examples.models import resnet20\n"
                "torch.manual_seed(0)\nq = fracpass.transform(resnet20(), fracpass.Plan.load({plan!r}))\n"
                "sys.stdout.write(fracpass.graph_text(q))\n")


def test_graph_text_is_deterministic_across_processes_and_hash_seeds():
    code = TEXT_SNIPPET.format(root=str(ROOT), plan=str(PLAN))
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONHASHSEED=seed)).stdout for seed in ("0", "12345")]
    assert outs[0] and outs[0] == outs[1]
    in_process = fracpass.graph_text(fracpass.transform(EXAMPLE_MODELS["resnet20"][0](), fracpass.Plan.load(PLAN)))
    assert in_process == outs[0]
    assert "0x" not in in_process  # no addresses


def test_graph_text_content():
    qmodel = fracpass.transform(EXAMPLE_MODELS["resnet20"][0](), fracpass.Plan.load(PLAN))
    text = fracpass.graph_text(qmodel)
    lines = text.splitlines()
    assert lines[0] == "# fracpass graph: CifarResNet, captured with fx, train graph"
    assert lines[1] == "# stages (w/a/g): 3/3/6, 4/4/6, 6/6/8, 8/8/8"
    assert "%layer1_0_conv1_aq = quant.act[a 3>4>6>8](%relu)" in lines
    assert "%layer1_0_conv1_gq = quant.grad[g 6>6>8>8](%layer1_0_conv1)" in lines
    assert ("%layer1_0_conv1 = conv2d @layer1.0.conv1 torch.conv2d(%layer1_0_conv1_aq, %layer1_0_conv1_wq, None, "
            "(1, 1), (1, 1), (1, 1), 1)") in lines
    assert "%conv1 = conv2d @conv1 Conv2d conv1(%x)  # excluded: stem kept at full precision" in lines
    assert lines[-1] == "output %fc"
    assert text == (GOLDEN / "resnet20.graph.txt").read_text()  # the shipped golden is current


def test_export_path_text_is_stable():
    factory, make_input = EXAMPLE_MODELS["transformer_sdpa"]
    texts = [fracpass.graph_text(fracpass.transform(factory(), fracpass.Plan.progressive(),
                                                    example_inputs=(make_input(2),), capture_method="export"))
             for _ in range(2)]
    assert texts[0] == texts[1] and "sdpa @layers.0.attn aten.scaled_dot_product_attention.default" in texts[0]


def variant_module(tmp_path, body):
    (tmp_path / "variants.py").write_text("import torch\nfrom torch import nn\nfrom examples.models import *\n" + body)
    return tmp_path


def golden_copy(tmp_path):
    golden = tmp_path / "golden"
    golden.mkdir()
    for f in GOLDEN.iterdir():
        (golden / f.name).write_text(f.read_text())
    return golden


def test_changed_rule_fails_with_a_diff_naming_it_then_update_passes(tmp_path):
    golden = golden_copy(tmp_path)
    plan = fracpass.Plan.load(PLAN)
    changed = fracpass.Plan(plan.stages, plan.rules + (fracpass.Rule(match="layer2.0.conv1", w=4, a=4),))
    changed.save(tmp_path / "changed.toml")
    args = ("check", "--model", "examples.models:resnet20", "--plan", str(tmp_path / "changed.toml"), "--golden",
            str(golden), "--input-shape", "1,3,32,32")
    done = run(*args)
    assert done.returncode == 1, done.stderr
    assert "changed %layer2_0_conv1_wq: quant.weight[w 3>4>6>8 axis=0]" in done.stdout
    assert "->  quant.weight[w 4>4>4>4 axis=0]" in done.stdout
    assert "-%layer2_0_conv1_aq = quant.act[a 3>4>6>8](%layer1_2_relu2)" in done.stdout
    assert "+%layer2_0_conv1_aq = quant.act[a 4>4>4>4](%layer1_2_relu2)" in done.stdout
    assert "-w = [3, 4, 6, 8]" in done.stdout and "+w = [4, 4, 4, 4]" in done.stdout  # the StagePlan diff too
    assert done.stdout.rstrip().endswith("FAILED")
    assert run(*args, "--update").returncode == 0
    assert run(*args).returncode == 0


def test_new_layer_and_removed_quantizer_fail(tmp_path):
    golden = golden_copy(tmp_path)
    variant_module(tmp_path, (
        "class Deeper(CifarResNet):\n"
        "    def __init__(self):\n"
        "        super().__init__(20)\n"
        "        self.extra = nn.Linear(10, 10)\n"
        "    def forward(self, x):\n"
        "        return self.extra(super().forward(x))\n"
        "def resnet20():\n"
        "    torch.manual_seed(0)\n"
        "    return Deeper()\n"))
    done = run("check", "--model", "variants:resnet20", "--plan", str(PLAN), "--golden", str(golden), cwd=tmp_path)
    assert done.returncode == 1
    assert "added %extra_aq: quant.act[a 3>4>6>8](%fc)" in done.stdout
    assert re.search(r"added %extra: linear @extra torch\.nn\.functional\.linear", done.stdout)
    plan = fracpass.Plan.load(PLAN)
    fewer = fracpass.Plan(plan.stages, plan.rules + (fracpass.Rule(match="layer3.2.conv2", exclude=True),))
    fewer.save(tmp_path / "fewer.toml")
    done = run("check", "--model", "examples.models:resnet20", "--plan", str(tmp_path / "fewer.toml"), "--golden",
               str(golden))
    assert done.returncode == 1
    for suffix in ("aq", "wq", "gq"):
        assert f"removed %layer3_2_conv2_{suffix}:" in done.stdout


def test_coverage_numbers_and_reasons():
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    cov = fracpass.coverage(fracpass.transform(factory(), fracpass.Plan.load(PLAN), example_inputs=(make_input(2),)))
    assert cov.ops == {"act": (20, 22), "weight": (20, 22), "grad": (20, 22)}
    total = 40813184 * 2
    stem, fc = 2 * 3 * 16 * 9 * 1024, 2 * 640
    assert cov.macs["weight"] == (total - stem - fc, total)
    assert cov.minimum == pytest.approx(20 / 22)
    assert ("conv1", "act,grad,weight", "excluded by plan rule 0 (match='conv1'): stem kept at full precision") \
        in cov.unquantized
    factory, make_input = EXAMPLE_MODELS["transformer_matmul"]
    cov = fracpass.coverage(fracpass.transform(factory(), fracpass.Plan.static(w=8, a=8, g=32),
                                               example_inputs=(make_input(2),)))
    assert cov.ops["weight"] == (13, 13) and cov.ops["act"] == (17, 17) and cov.ops["grad"] == (0, 17)
    assert all(why == "the plan keeps this role at 32 bits (full precision) in every stage"
               for _, roles, why in cov.unquantized) and len(cov.unquantized) == 17
    factory, make_input = EXAMPLE_MODELS["mobilenet_v2"]
    cov = fracpass.coverage(fracpass.transform(factory(), fracpass.Plan.static(), example_inputs=(make_input(2),)))
    assert cov.minimum == 1.0 and cov.unquantized == []


def test_coverage_names_unsupported_and_leaf_modules():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])

    x = torch.randn(2, 3, 8)
    cov = fracpass.coverage(fracpass.transform(Opaque(), fracpass.Plan.static(), example_inputs=(x,),
                                               leaf_modules=[nn.MultiheadAttention]))
    (op, roles, reason), = cov.unquantized
    assert (op, roles) == ("attn", "act,grad,weight")
    assert reason.startswith("inside leaf module 'attn' (MultiheadAttention): its compute runs at full precision")
    # in-projection 2*3*8*24 + QK^T and AV 2 * 2*2*3*3*4 + out-projection 2*3*8*8, by the flop counter's rules
    assert "(1,824 forward MACs)" in reason
    assert "not quantized: attn [act,grad,weight]: inside leaf module 'attn'" in str(cov)
    data = cov.to_dict()
    assert data["ops"]["act"]["fraction"] == 0.5 and data["unquantized"][0]["op"] == "attn"
    # left to fracpass, MultiheadAttention is traced into and every product in it is quantized
    traced = fracpass.coverage(fracpass.transform(Opaque(), fracpass.Plan.static(), example_inputs=(x,))).to_dict()
    assert traced["ops"]["act"] == {"quantized": 5, "total": 5, "fraction": 1.0}


def test_min_coverage_and_output_formats(tmp_path):
    golden = golden_copy(tmp_path)
    base = ("check", "--model", "examples.models:resnet20", "--plan", str(PLAN), "--golden", str(golden),
            "--input-shape", "1,3,32,32")
    done = run(*base, "--min-coverage", "0.95")
    assert done.returncode == 1 and "FAIL: coverage 90.9% is below --min-coverage 95.0%" in done.stdout
    done = run(*base, "--min-coverage", "0.9", "--format", "json")
    data = json.loads(done.stdout)
    assert done.returncode == 0 and data["ok"] and data["coverage"]["minimum"] == pytest.approx(20 / 22)
    (golden / "resnet20.graph.txt").write_text((golden / "resnet20.graph.txt").read_text().replace("a 3>4>6>8", "a 8", 1))
    done = run(*base, "--format", "github")
    assert done.returncode == 1
    assert re.search(r"^::error file=.*resnet20\.graph\.txt,title=fracpass graph changed::changed %", done.stdout, re.M)
    assert "::notice title=fracpass coverage::conv1 [act,grad,weight] not quantized" in done.stdout


@pytest.mark.parametrize("args, code, message", [
    (["--model", "nope_pkg.models:f", "--golden", "g"], 2, r"cannot import 'nope_pkg\.models': ModuleNotFoundError"),
    (["--model", "examples.models:resnet20", "--golden", "g", "--plan", "BAD"], 2, r"not valid TOML"),
    (["--model", "examples.models:resnet20", "--golden", "g", "--min-coverage", "95"], 2,
     r"--min-coverage 95.0: give a fraction between 0 and 1"),
    (["--model", "examples.models:resnet20"], 2, r"the following arguments are required: --golden"),
    (["--model", "examples.models:resnet20", "--golden", "EMPTY"], 1, r"golden file missing; create it with --update"),
])
def test_check_exit_codes_and_messages(tmp_path, args, code, message):
    (tmp_path / "bad.toml").write_text("[[stages]\n")
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "bad.toml") if a == "BAD" else str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    done = run("check", *args)
    assert done.returncode == code, done.stderr
    assert re.search(message, done.stdout + done.stderr)
    assert "Traceback" not in done.stderr


def test_pytest_helper(tmp_path, monkeypatch):
    qmodel = fracpass.transform(EXAMPLE_MODELS["resnet20"][0](), fracpass.Plan.load(PLAN))
    golden = tmp_path / "g" / "resnet20.graph.txt"
    with pytest.raises(AssertionError, match=r"does not exist; create it with FRACPASS_UPDATE_GOLDEN=1"):
        assert_graph_matches(qmodel, golden)
    monkeypatch.setenv(UPDATE_ENV, "1")
    assert_graph_matches(qmodel, golden)
    monkeypatch.delenv(UPDATE_ENV)
    assert_graph_matches(qmodel, golden)
    other = fracpass.transform(EXAMPLE_MODELS["resnet20"][0](), fracpass.Plan.static(exclude=("fc",)))
    with pytest.raises(AssertionError, match=r"(?s)differs from the golden file.*changed %layer1_0_conv1_aq.*"
                                             r"If the change is intended"):
        assert_graph_matches(other, golden)


def test_pytest_option_updates(pytester):
    """The plugin that fracpass installs (entry point pytest11): --fracpass-update-golden writes a missing golden file.
    pytester runs pytest in this process, as a fresh session that loads the installed plugins."""
    pytester.makepyfile(test_golden=(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport fracpass\nfrom examples.models import resnet20\n"
        "from fracpass.testing import assert_graph_matches\n"
        "def test_it():\n"
        "    assert_graph_matches(fracpass.transform(resnet20(), fracpass.Plan.static()), 'golden.txt')\n"))
    first = pytester.runpytest_inprocess("-q", "test_golden.py")
    assert first.ret == 1 and "does not exist" in first.stdout.str()
    update = pytester.runpytest_inprocess("-q", "--fracpass-update-golden", "test_golden.py")
    assert update.ret == 0, update.stdout.str()
    again = pytester.runpytest_inprocess("-q", "test_golden.py")
    assert again.ret == 0 and (pytester.path / "golden.txt").exists()


def test_example_ci_workflow_command_passes():
    workflow = (ROOT / "examples" / "ci" / "fracpass-check.yml").read_text()
    command = re.search(r"run: (fracpass check .*)", workflow).group(1)
    done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "::notice title=fracpass check::graph matches golden files; min coverage 90.9%" in done.stdout
