"""pytest helpers for users' CI: compare a transformed model's graph with a golden file.

    from fracpass.testing import assert_graph_matches
    def test_graph():
        assert_graph_matches(qmodel, "golden/resnet20.graph.txt")

Regenerate goldens with ``FRACPASS_UPDATE_GOLDEN=1 pytest`` or ``pytest --fracpass-update-golden``
(this module is a pytest plugin, registered when fracpass is installed).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from fracpass.check import compare_text, graph_text

__all__ = ["assert_graph_matches", "UPDATE_ENV"]

UPDATE_ENV = "FRACPASS_UPDATE_GOLDEN"
_UPDATE_OPTION = {"on": False}


def _updating(update: Optional[bool]) -> bool:
    if update is not None:
        return update
    return _UPDATE_OPTION["on"] or os.environ.get(UPDATE_ENV, "") not in ("", "0", "false", "no")


def assert_graph_matches(qmodel, golden: Union[str, Path], update: Optional[bool] = None) -> None:
    """Fail with a unified diff (and a summary of nodes added, removed, changed) when the graph
    text differs from ``golden``; write the file instead when updating or when it does not exist
    yet is an error (say --fracpass-update-golden or FRACPASS_UPDATE_GOLDEN=1 to create it)."""
    path = Path(golden)
    text = graph_text(qmodel)
    if _updating(update):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        raise AssertionError(f"golden file {path} does not exist; create it with {UPDATE_ENV}=1 pytest "
                             "(or pytest --fracpass-update-golden)")
    mismatch = compare_text(path.read_text(), text, str(path))
    if mismatch is not None:
        raise AssertionError(f"{mismatch}\nIf the change is intended, update with {UPDATE_ENV}=1 pytest "
                             "(or pytest --fracpass-update-golden)")


def pytest_addoption(parser) -> None:
    parser.addoption("--fracpass-update-golden", action="store_true", default=False,
                     help="fracpass: rewrite golden graph files instead of comparing them")


def pytest_configure(config) -> None:
    _UPDATE_OPTION["on"] = bool(config.getoption("--fracpass-update-golden", default=False))
