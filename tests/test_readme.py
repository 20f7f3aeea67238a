"""The README is a front page: what a new user reads first, runs first, and the plan the commands use.

Every block of the README and of docs/ is run by tests/test_docs.py; these are the README's own promises.
"""
import re

from conftest import ROOT
from test_docs import blocks, run_python_block, section

README = ROOT / "README.md"
PLAN = ROOT / "examples" / "plans" / "plan.toml"


def test_the_readmes_plan_is_the_shipped_plan_file():
    """The command-line examples name examples/plans/plan.toml; the README and docs/plans.md show it as it is."""
    shipped = PLAN.read_text()
    assert blocks(README, "toml")[0][2] == shipped
    assert blocks(ROOT / "docs" / "plans.md", "toml")[0][2] == shipped
    import fracpass

    plan = fracpass.Plan.load(PLAN)
    assert plan.num_stages == 4 and len(plan.rules) == 3


def test_use_block_runs_on_its_own(tmp_path):
    """The block a new user runs first (the rest run in the slow tests of tests/test_docs.py)."""
    use = [(line, code) for line, _, code in blocks(README, "python") if code in section(README, "Use")]
    assert len(use) == 1
    out = run_python_block(tmp_path, f"README.md:{use[0][0]}", use[0][1])
    assert "compute ops: 20 quantized, 2 excluded" in out and "stage 3 of 4" in out


def test_quick_start_says_how_long_the_commands_take_and_names_a_fast_subset():
    quick = section(README, "Quick start")
    assert re.search(r"demo takes about \d+ s on a fresh", quick) and "8–12 min" in quick
    subset = re.search(r"`(python -m pytest -q (tests/\S+\.py ?)+)`", quick.replace("\n", " "))
    assert subset, "the Quick start names a fast subset of the tests"
    assert all((ROOT / path).is_file() for path in subset.group(1).split()[4:])


def test_the_readme_stays_a_front_page():
    lines = README.read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move the detail into docs/ and link it"
