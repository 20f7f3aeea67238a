"""``fracpass demo``: the README's first command, run as a user would (``--quick``)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_demo_quick_trains_three_recipes_prints_the_table_and_writes_the_plots(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fracpass", "demo", "--quick", "--out", str(tmp_path / "demo")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for column in ("test acc. % (mean ± std)", "training BitOPs (paper)", "vs FP32", "saving vs 8/8/8",
                   "energy J (bitfusion)", "latency s (bitfusion)"):
        assert column in out
    table = out[out.index("recipe "):].splitlines()
    assert [line.split("  ")[0] for line in table[2:5]] == ["FP32", "static 8/8/8 (SBM)", "FracTrain (PFQ + DFQ)"]
    assert "option mix per stage" in out
    assert "it/s" in done.stderr or "s/it" in done.stderr  # a progress bar per run
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["recipes"] == ["fp32", "static-8/8/8", "fractrain"] and results["command"] == "fracpass demo --quick"
    assert results["summary"]["static-8/8/8"]["relative_to_fp32"]["paper"] == 0.0625
    assert results["summary"]["fp32"]["relative_to_fp32"] == {"paper": 1.0, "whole": 1.0}
    for name in ("results.md", "precision.png", "loss.png", "bitops_accuracy.png", "gates_fractrain.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 1000, name
    text = (tmp_path / "demo" / "results.md").read_text()
    assert "1 seed (0)" in text and "1 seeds" not in text  # one seed, said in the singular
    lines = text.splitlines()
    for i, line in enumerate(lines):  # no heading left without its lines (the demo runs no PFQ: no floors)
        if line.endswith(":") and line.startswith("Floors"):
            assert i + 1 < len(lines) and lines[i + 1].startswith("- "), lines[i:i + 3]


def test_plots_say_mean_over_seeds_only_for_several_seeds():
    from fracpass.experiments.plots import _over_seeds

    assert _over_seeds({"seeds": [0], "runs": []}) == ""
    assert _over_seeds({"seeds": [0, 1, 2], "runs": []}) == ", mean over 3 seeds"

