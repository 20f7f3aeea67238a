import contextlib
import io
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_check.py runs fracpass's pytest plugin in a pytest of its own

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples import models  # noqa: E402

# FRACPASS_TEST_CLAIM_UNITS=1: the tests run as if this CPU had int8 and bf16 dot-product units, so the native
# tests that skip without them run too (their paths emulated where the CPU lacks the instructions: slower). CI's
# CPUs lack them: run `FRACPASS_TEST_CLAIM_UNITS=1 python -m pytest tests/native` after a change to native.
if os.environ.get("FRACPASS_TEST_CLAIM_UNITS"):
    from fracpass.native import units as _units

    _CLAIMED = _units._cpu_flags() | {"avx512_bf16", "avx512_vnni", "amx_int8", "amx_bf16"}
    _units._cpu_flags = lambda: _CLAIMED


def _token_input(batch):
    return torch.randint(0, 100, (batch, 16), generator=torch.Generator().manual_seed(batch))


# name -> (factory, example-input maker taking a batch size)
EXAMPLE_MODELS = {
    "resnet20": (models.resnet20, lambda b: torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))),
    "mobilenet_v2": (lambda: models.mobilenet_v2(width_mult=0.25),
                     lambda b: torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))),
    "transformer_sdpa": (lambda: models.transformer(attention="sdpa"), _token_input),
    "transformer_matmul": (lambda: models.transformer(attention="matmul"), _token_input),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cli_in_process(*args, cwd=ROOT):
    """``python -m fracpass *args`` run by ``fracpass.cli.main`` in this process, without the 3 s start of an
    interpreter: its exit code, stdout and stderr. What ``--model`` imported from ``cwd`` (the CLI puts it on
    sys.path) is forgotten after, as it would be with the process. tests/test_reliability_cli.py runs the CLI
    in subprocesses, for the exit code and the shape of stderr."""
    from fracpass.cli import main

    out, err, here, path, modules = io.StringIO(), io.StringIO(), os.getcwd(), list(sys.path), set(sys.modules)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse: --help, usage errors
                code = e.code
    finally:
        os.chdir(here)
        sys.path[:] = path
        if pathlib.Path(cwd).resolve() != ROOT:
            for name in set(sys.modules) - modules:
                if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(pathlib.Path(cwd).resolve())):
                    del sys.modules[name]
    return subprocess.CompletedProcess(["fracpass", *args], code, out.getvalue(), err.getvalue())
