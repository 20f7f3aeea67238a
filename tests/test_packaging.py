"""The wheel holds every fracpass module and data file (issue 27, item 6).

The first test reads pyproject.toml against the source tree (fast). The second builds the wheel from a clean copy
of the tree, installs it into a fresh venv outside the repository and imports every module there, as a user's
``pip install fracpass`` would.
"""
import json
import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

from conftest import ROOT

# passes/ and targets/ sit beside fracpass/ and install as fracpass.passes and fracpass.targets
MAPPED = {"fracpass.passes": ROOT / "passes", "fracpass.targets": ROOT / "targets"}
# files the wheel must carry besides modules, as globs relative to each package's folder
DATA = {"fracpass": ["csrc/*.cpp", "csrc/*.h"], "fracpass.passes": ["README.md"], "fracpass.targets": ["*.toml"]}


def source_packages() -> dict:
    """package name -> its folder in the source tree: every folder under fracpass/ with an __init__.py, and the
    mapped ones."""
    found = {}
    for init in sorted((ROOT / "fracpass").rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT)
        if all((ROOT / Path(*rel.parts[:i]) / "__init__.py").exists() for i in range(1, len(rel.parts) + 1)):
            found[".".join(rel.parts)] = init.parent
    return {**found, **MAPPED}


def source_modules() -> set:
    """Every module the source tree defines, by its installed name (fracpass.__main__ left out: importing it runs
    the command line)."""
    modules = set()
    for package, folder in source_packages().items():
        modules.add(package)
        modules.update(f"{package}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")
    return modules - {"fracpass.__main__"}


def source_data_files() -> set:
    return {f"{package.replace('.', '/')}/{p.relative_to(source_packages()[package]).as_posix()}"
            for package, globs in DATA.items() for g in globs for p in source_packages()[package].glob(g)}


def test_pyproject_lists_every_package_of_the_source_tree():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, expected = set(config["packages"]), set(source_packages())
    assert not expected - listed, (f"pyproject.toml's [tool.setuptools] packages leaves out {sorted(expected - listed)}: "
                                   "add them, or the wheel ships without them")
    assert not listed - expected, f"pyproject.toml lists packages the source tree lacks: {sorted(listed - expected)}"
    assert {k: v for k, v in config["package-dir"].items() if k in MAPPED} == \
        {k: v.name for k, v in MAPPED.items()}
    for package, globs in DATA.items():
        assert set(globs) <= set(config["package-data"][package]), package


# Run in the venv, from a folder outside the repository: import fracpass and every module found under it.
IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys, traceback
import fracpass
found, failed = {"fracpass": fracpass.__file__}, {}
def remember(name):
    failed[name] = traceback.format_exc()
for info in pkgutil.walk_packages(fracpass.__path__, "fracpass.", onerror=remember):
    if info.name == "fracpass.__main__":
        continue
    try:
        found[info.name] = importlib.import_module(info.name).__file__
    except Exception:
        remember(info.name)
print(json.dumps({"modules": found, "failed": failed, "version": fracpass.__version__, "path": sys.path}))
"""


def _run(cmd, **kwargs):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow  # 50-70 s on 2 busy cores: a wheel build, a venv with pip, importing transformers and lightning
def test_wheel_installs_every_module_and_data_file_outside_the_repository(tmp_path):
    # a clean copy: a stale build/ in the tree would put modules into the wheel that the source no longer has
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                              ".pytest_cache", ".hypothesis", "fracpass-demo"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
          src])
    (wheel,) = (tmp_path / "dist").glob("fracpass-*.whl")
    env_dir = tmp_path / "venv"
    # torch, transformers, lightning and the rest come from this interpreter's site-packages
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    # --ignore-installed: this interpreter's site may hold an (editable) fracpass; the venv gets its own copy
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = _run([python, "-c", IMPORT_EVERY_MODULE], cwd=outside, env=env)
    result = json.loads(done.stdout.splitlines()[-1])

    assert not result["failed"], "\n".join(f"{name}:\n{tb}" for name, tb in result["failed"].items())
    installed = Path(result["modules"]["fracpass"]).parent
    assert installed.is_relative_to(env_dir), f"fracpass imported from {installed}, not from the venv's wheel"
    assert all(Path(f).is_relative_to(installed) for f in result["modules"].values()), result["modules"]
    missing = source_modules() - set(result["modules"])
    assert not missing, f"the wheel lacks {sorted(missing)}"
    assert {"fracpass.integrations.transformers", "fracpass.integrations.lightning"} <= set(result["modules"])
    files = {p.relative_to(installed.parent).as_posix() for p in installed.rglob("*") if p.is_file()}
    assert source_data_files() <= files, f"the wheel lacks {sorted(source_data_files() - files)}"
    assert {"fracpass/targets/bitfusion.toml", "fracpass/passes/README.md"} <= files

    import fracpass

    done = _run([env_dir / "bin" / "fracpass", "--version"], cwd=outside, env=env)
    assert done.stdout.strip() == f"fracpass {fracpass.__version__}" == f"fracpass {result['version']}"
    assert wheel.name.startswith(f"fracpass-{fracpass.__version__}-")
