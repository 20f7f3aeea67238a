"""Every code block of README.md and docs/*.md runs as written, so the documentation cannot rot.

Each ``python`` block runs on its own, in a fresh interpreter, in an empty folder outside the
repository, with the installed fracpass: a block imports and defines everything it uses. What a
block's ``print(...)  # ...`` comment shows as output (a comment of numbers and quoted strings, such
as ``# [(2, 0, 1, 'reached step 2')]``) must appear in what it printed.

``bash`` blocks run in order, one folder per page, with the checkout's ``examples/`` linked into the
folder, so the shipped ``examples/plans/plan.toml`` that the command-line examples name resolves
as it does in a checkout. ``pip install`` steps are the install the pages assume done, the
test-suite commands are not re-run from inside the tests, and the README's Quick start is run by
tests/test_demo.py and tests/test_examples.py.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
RUN = {"python", "bash", "sh"}
# a block that is not code to run says what it is: toml, text (diagrams, layouts, tables)
LANGUAGES = RUN | {"toml", "text"}
OPTIONAL = ("transformers", "lightning")


def page_name(page):
    return str(page.relative_to(ROOT))


def blocks(page, *languages):
    """(line number, language, code) of every fenced block of ``page`` in those languages (all if none)."""
    text = page.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)
            if not languages or m.group(1) in languages]


def section(page, title):
    """The text of ``page`` under the heading ``title`` (any level), up to the next heading of any level.
    A ``#`` line inside a code block (a shell comment) is not a heading."""
    text = page.read_text()
    prose = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # same offsets, code blanked out
    headings = [m for m in re.finditer(r"^#+ (.*)$", prose, re.M)]
    start = next(m.end() for m in headings if m.group(1) == title)
    end = next((m.start() for m in headings if m.start() > start), len(text))
    return text[start:end]


def _env():
    # the installed package, not the checkout: the folder is outside the repository
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def claimed_outputs(code):
    """What the block's ``print(...)  # ...`` comments say it prints, where the comment is an output
    (numbers, brackets and quoted strings), not a description."""
    claims = []
    for m in re.finditer(r"^\s*print\(.*\)\s+#\s*(.+?)\s*$", code, re.M):
        claim = m.group(1)
        if not re.search(r"[A-Za-z]", re.sub(r"'[^']*'", "", claim)):
            claims.append(claim)
    return claims


def test_every_block_says_its_language_and_python_blocks_compile():
    """The fast check, in the default suite; running the blocks is the slow test below."""
    untagged, hidden, broken = [], [], []
    for page in PAGES:
        for line, lang, code in blocks(page):
            where = f"{page_name(page)}:{line}"
            if lang not in LANGUAGES:
                untagged.append((where, code.splitlines()[0] if code else ""))
            elif lang in ("text", "toml") and re.search(r"^\s*(fracpass|python|pip|torchrun) ", code, re.M):
                hidden.append(where)
            elif lang == "python":
                try:
                    compile(code, where, "exec")
                except SyntaxError as e:
                    broken.append(f"{where}: {e}")
    assert not untagged, f"blocks without a known language (tag them {sorted(LANGUAGES)}): {untagged}"
    assert not hidden, f"blocks that hold commands but are not tagged bash, so no test runs them: {hidden}"
    assert not broken, "python blocks that do not compile:\n" + "\n".join(broken)
    assert len(PYTHON_BLOCKS) >= 10 and {p for p, _, _ in PYTHON_BLOCKS} >= {"README.md", "docs/plans.md"}


def test_the_readme_links_every_page_and_every_relative_link_resolves():
    readme = (ROOT / "README.md").read_text()
    unlinked = [page_name(p) for p in PAGES[1:] if f"]({page_name(p)})" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    dangling = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if path and not re.match(r"\w+:", path) and not (page.parent / path).exists():
                dangling.append(f"{page_name(page)}: {target}")
    assert not dangling, f"links to files that do not exist: {dangling}"


def test_the_cli_examples_use_the_shipped_plan():
    commands = [(page_name(p), line, code) for p in PAGES for line, _, code in blocks(p, "bash", "sh")]
    named = [m for _, _, code in commands for m in re.findall(r"--plan (\S+)", code)]
    assert named and all((ROOT / plan).is_file() and plan.startswith("examples/plans/") for plan in named), named
    assert (ROOT / "examples/plans/plan.toml").is_file() and "examples/plans/plan.toml" in named


def _python_blocks():
    return [(page_name(page), line, code) for page in PAGES for line, _, code in blocks(page, "python")]


PYTHON_BLOCKS = _python_blocks()


def run_python_block(folder, where, code):
    """Run ``code`` alone in a fresh interpreter in ``folder``; returns its stdout."""
    script = folder / "block.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=600,
                          env=_env())
    assert done.returncode == 0, f"the python block at {where} failed on its own:\n{done.stderr[-4000:]}"
    missing = [claim for claim in claimed_outputs(code) if claim not in done.stdout]
    assert not missing, f"the python block at {where} did not print what its comments say: {missing}\n{done.stdout[-3000:]}"
    return done.stdout


@pytest.mark.slow  # every python block, each in its own interpreter: ~15-20 blocks of 5-20 s (Trainer, Lightning, ONNX)
@pytest.mark.parametrize("where,code", [(f"{p}:{line}", code) for p, line, code in PYTHON_BLOCKS],
                         ids=[f"{p}:{line}" for p, line, _ in PYTHON_BLOCKS])
def test_python_block_runs_on_its_own(tmp_path, where, code):
    missing = [m for m in OPTIONAL if re.search(rf"^\s*(import|from) {m}\b", code, re.M)
               and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{where} needs {missing}, not installed")
    run_python_block(tmp_path, where, code)


def commands(code):
    """The block's commands, continuation lines joined and comments dropped; ``pip install`` steps and
    test-suite runs left out."""
    found = []
    for command in re.sub(r"\\\n\s*", " ", code).splitlines():
        command = command.split(" #", 1)[0].strip() if not command.lstrip().startswith("#") else ""
        parts = [p.strip() for p in command.split("&&") if p.strip() and not p.strip().startswith("pip install")]
        if parts and not any("-m pytest" in p for p in parts):
            found.append(" && ".join(parts))
    return found


def shell_folder(tmp_path):
    """An empty folder where the shipped examples (and so examples/plans/plan.toml) are where a checkout has them."""
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    return tmp_path


def run_shell(commands, folder):
    outputs = []
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=folder, capture_output=True, text=True, timeout=600,
                              env=_env())
        assert done.returncode == 0, f"command failed ({done.returncode}): {command}\n{done.stdout[-2000:]}" \
                                     f"\n{done.stderr[-2000:]}"
        outputs.append(done.stdout)
    return outputs


def test_check_commands_pass_with_the_shipped_plan(tmp_path):
    """`fracpass check --update`, then `--min-coverage`, with examples/plans/plan.toml, as docs/ci.md writes them."""
    ci = ROOT / "docs" / "ci.md"
    found = [c for _, _, code in blocks(ci, "bash") if code in section(ci, "Guarding rewrites in CI")
             for c in commands(code)]
    assert len(found) == 2 and "--update" in found[0] and "--min-coverage" in found[1]
    out = run_shell(found, shell_folder(tmp_path))
    assert "OK: graph matches the golden files" in out[1]


def test_cost_command_prints_the_percentages_beside_it(tmp_path):
    cost = ROOT / "docs" / "cost.md"
    code = blocks(cost, "bash")[0][2]
    claimed = re.search(r"\(([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+) % of FP32", code).groups()
    out = run_shell(commands(code)[:1], shell_folder(tmp_path))[0]
    assert tuple(re.findall(r"\(([\d.]+)% of FP32\)", out)) == claimed, out


SHELL_PAGES = [p for p in PAGES if blocks(p, "bash", "sh")]


@pytest.mark.slow  # every command: ResNet-74 costs, a budget plan, ONNX exports, a short bench (~2-3 min)
@pytest.mark.parametrize("page", SHELL_PAGES, ids=[page_name(p) for p in SHELL_PAGES])
def test_every_shell_block_runs_in_order(tmp_path, page):
    quick = section(page, "Quick start") if page.name == "README.md" else ""  # run by tests/test_demo.py
    found = [c for _, _, code in blocks(page, "bash", "sh") if not (quick and code in quick) for c in commands(code)]
    if not found:
        pytest.skip(f"{page_name(page)}: only install and test-suite commands")
    run_shell(found, shell_folder(tmp_path))


def test_output_comments_are_told_from_descriptions():
    code = ("print(sched.history)   # [(2, 0, 1, 'reached step 2')]\n"
            "print(plan.num_stages, len(plan.rules))      # 4 3\n"
            "print(fracpass.summary(qmodel))   # op, kind, module, w/a/g bits\n"
            "x = f()   # 5\n")
    assert claimed_outputs(code) == ["[(2, 0, 1, 'reached step 2')]", "4 3"]
