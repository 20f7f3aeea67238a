"""The README's code blocks run as written, from a folder outside the repository, so they cannot rot.

Python blocks run in order in one interpreter (a reader pasting them into one session): a fragment
may use what an earlier block defined, and a few names that stand for the reader's own model and
data (``READER`` below). Shell blocks run in order in one folder, after the README's plan (its first
``toml`` block) is saved there as ``plan.toml``, as the README says; ``pip install`` steps are the
install the README assumes done, and the test-suite command is not re-run from inside the tests.
"""
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
RUN = {"python", "bash", "sh"}
# a block that is not code to run says what it is: toml, text (diagrams, layouts, tables)
LANGUAGES = RUN | {"toml", "text"}

READER = """\
import torch
from fracpass.models import resnet20
model = resnet20()
x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
loader = [(x, y)] * 3
criterion = torch.nn.CrossEntropyLoss()
epoch = 0
"""


def blocks(*languages):
    """(line number, language, code) of every fenced block in those languages."""
    return [(README[:m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in FENCE.finditer(README)
            if m.group(1) in languages]


def _env():
    # the installed package, not the checkout: the folder is outside the repository
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env


def test_every_block_says_its_language_and_commands_are_run():
    untagged = [(line, code.splitlines()[0] if code else "") for line, lang, code in blocks(*{
        m.group(1) for m in FENCE.finditer(README)}) if lang not in LANGUAGES]
    assert not untagged, f"README blocks without a known language (tag them {sorted(LANGUAGES)}): {untagged}"
    hidden = [line for line, lang, code in blocks("text", "toml")
              if re.search(r"^\s*(fracpass|python|pip) ", code, re.M)]
    assert not hidden, f"README blocks at lines {hidden} hold commands but are not tagged bash, so no test runs them"


def _python_session():
    parts = [READER]
    for line, _, code in blocks("python"):
        needs = [m for m in ("transformers", "lightning") if re.search(rf"^\s*(import|from) {m}\b", code, re.M)]
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            parts.append(f"print('README line {line}: skipped, {missing} not installed')\n")
            continue
        parts.append(f"print('README line {line}', flush=True)\n" + code)
    return "\n".join(parts)


def _run_python(tmp_path, source):
    script = tmp_path / "readme_session.py"
    script.write_text(source)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=_env())
    last = re.findall(r"^README line (\d+)", done.stdout, re.M)
    assert done.returncode == 0, (f"the README's python block at line {last[-1] if last else '?'} failed:\n"
                                  f"{done.stderr[-4000:]}")
    return done.stdout


def _section(title):
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_use_and_plain_pytorch_loop_blocks_run(tmp_path):
    """The two blocks a new user runs first, on their own (the whole session is the slow test below)."""
    use = [code for _, _, code in blocks("python") if code in _section("Use")]
    loop = [code for _, _, code in blocks("python") if code in _section("Use with your training loop")]
    assert len(use) == 1 and len(loop) == 3 and "import lightning" in loop[2] and "FracpassTrainer" in loop[1]
    out = _run_python(tmp_path, use[0] + "\n" + loop[0])
    assert "[(2, 0, 1, 'reached step 2')]" in out and "compute ops: 20 quantized, 2 excluded" in out


@pytest.mark.slow  # every python block in one session: transforms, a Trainer and a Lightning fit, an export (~90 s)
def test_python_blocks_run_in_order(tmp_path):
    out = _run_python(tmp_path, _python_session())
    assert out.count("[(2, 0, 1, 'reached step 2')]") == 2 + (importlib.util.find_spec("lightning") is not None)


def _commands(code):
    """The block's commands, continuation lines joined; the README's install step left out."""
    commands = []
    for command in re.sub(r"\\\n\s*", " ", code).splitlines():
        command = command.split(" #", 1)[0].strip() if not command.lstrip().startswith("#") else ""
        parts = [p.strip() for p in command.split("&&") if p.strip() and not p.strip().startswith("pip install")]
        if parts and not any("-m pytest" in p for p in parts):
            commands.append(" && ".join(parts))
    return commands


def _shell_folder(tmp_path):
    toml = blocks("toml")[0][2]
    (tmp_path / "plan.toml").write_text(toml)
    return tmp_path


def _run_shell(commands, folder):
    outputs = []
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=folder, capture_output=True, text=True, timeout=600,
                              env=_env())
        assert done.returncode == 0, f"README command failed ({done.returncode}): {command}\n{done.stdout[-2000:]}" \
                                     f"\n{done.stderr[-2000:]}"
        outputs.append(done.stdout)
    return outputs


def test_check_command_passes_with_the_readmes_plan(tmp_path):
    """`fracpass check --min-coverage` with the README's own plan, as written (the CI section)."""
    section = _section("Guarding rewrites in CI")
    commands = [c for _, lang, code in blocks("bash") if code in section for c in _commands(code)]
    assert len(commands) == 2 and "--update" in commands[0] and "--min-coverage" in commands[1]
    out = _run_shell(commands, _shell_folder(tmp_path))
    assert "OK: graph matches the golden files" in out[1]


def test_cost_command_prints_the_percentages_beside_it(tmp_path):
    section = _section("Cost: BitOPs, energy and latency")
    code = next(code for _, lang, code in blocks("bash") if code in section)
    claimed = re.search(r"\(([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+) % of FP32", code).groups()
    out = _run_shell(_commands(code)[:1], _shell_folder(tmp_path))[0]
    assert tuple(re.findall(r"\(([\d.]+)% of FP32\)", out)) == claimed, out


@pytest.mark.slow  # every command: the demo, ResNet-74 costs, a budget plan, ONNX exports (~2-3 min)
def test_every_shell_block_runs_in_order(tmp_path):
    folder = _shell_folder(tmp_path)
    quick = _section("Quick start")  # a checkout's commands, run by tests/test_examples.py from the repository root
    commands = [c for _, _, code in blocks("bash", "sh") if code not in quick for c in _commands(code)]
    assert any(c.startswith("fracpass plan") and "--input-shape" in c and "--budget" in c for c in commands)
    _run_shell(commands, folder)
    assert (folder / "model.onnx").is_file() and (folder / "stages.toml").is_file()
