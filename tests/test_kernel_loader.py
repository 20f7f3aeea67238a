"""fracpass.kernels's loader of the compiled extensions (the quantizers' and native execution's).

Contract: a build is cached per sources, flags, torch version and environment (compiler, torch's and
Python's header and library folders), so two environments sharing the cache keep one build each and
switching between them rebuilds nothing, while two checkouts of the same sources share one; a build is
announced before it starts, with its expected time; a build lock left by a killed build is removed (and
said so) within seconds, one held by a live process is waited on, naming the holder; FRACPASS_KERNELS=0
disables both extensions.

The compiler is stood in for by ``FakeNinja`` (a real build takes minutes here): it takes torch's lock
as ``cpp_extension.load`` does, and rebuilds when what build.ninja would hold changed, as ninja does.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import threading
import time

import pytest
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from fracpass import kernels

EXTENSIONS = [kernels.QUANT, kernels.NATIVE]


class FakeNinja:
    """Stands in for ``cpp_extension.load``: takes torch's ``lock`` (``FileBaton``: a load that finds it
    taken waits until it is gone, forever if its holder died), writes what build.ninja would hold in this
    environment, and "compiles" (rewrites the .so) when that changed or the .so is missing, as ninja does."""

    def __init__(self, log_text=lambda: ""):
        self.builds = []
        self.log_at_build = []
        self.log_text = log_text

    def __call__(self, name, sources, extra_cflags, build_directory, verbose):
        folder = pathlib.Path(build_directory)
        baton = FileBaton(str(folder / "lock"))
        if not baton.try_acquire():
            baton.wait()
            return f"module {name}"
        try:
            ninja = "\n".join([cpp_extension.get_cxx_compiler(), *cpp_extension.include_paths("cpu"),
                               *cpp_extension.library_paths("cpu"), str(sysconfig.get_path("include")), *extra_cflags,
                               *sources])
            recorded, so = folder / "fake.ninja", folder / f"{name}.so"
            if not so.exists() or not recorded.exists() or recorded.read_text() != ninja:
                recorded.write_text(ninja)
                so.write_bytes(b"%d" % len(self.builds))
                self.builds.append(name)
                self.log_at_build.append(self.log_text())
        finally:
            baton.release()
        return f"module {name}"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    ninja = FakeNinja()
    monkeypatch.setattr(cpp_extension, "load", ninja)
    return ninja


def _in_venv(monkeypatch, venv):
    """This process as if run from the venv ``venv`` with its own torch (its own include and library paths)."""
    monkeypatch.setattr(cpp_extension, "include_paths",
                        lambda device_type="cpu", **kw: [f"/{venv}/site-packages/torch/include",
                                                         f"/{venv}/site-packages/torch/include/torch/csrc/api/include"])
    monkeypatch.setattr(cpp_extension, "library_paths", lambda device_type="cpu", **kw: [f"/{venv}/site-packages/torch/lib"])


def _load(ext, tmp_path):
    """A fresh process's load of ``ext``: its build's name and its .so's mtime afterwards."""
    name = kernels.build_name(extension=ext)
    assert kernels._build(name, ext) == f"module {name}"
    return name, (tmp_path / name / f"{name}.so").stat().st_mtime_ns


@pytest.mark.parametrize("ext", EXTENSIONS, ids=lambda e: e.stem)
def test_two_environments_keep_a_build_each_and_switching_rebuilds_nothing(ext, fake, tmp_path, monkeypatch):
    loads = {}
    for venv in ["venv-a", "venv-b", "venv-a", "venv-b", "venv-a"]:
        with monkeypatch.context() as m:
            _in_venv(m, venv)
            loads.setdefault(venv, []).append(_load(ext, tmp_path))
    (a, *a_again), (b, *b_again) = loads["venv-a"], loads["venv-b"]
    assert a[0] != b[0], "environments with different include paths share a build directory"
    assert a_again == [a, a] and b_again == [b]  # same build, same .so: nothing rebuilt on a switch
    assert fake.builds == [a[0], b[0]]


def test_a_different_python_gets_its_own_build(fake, monkeypatch):
    real = sysconfig.get_path
    name = kernels.build_name()
    monkeypatch.setattr(sysconfig, "get_path",
                        lambda key, *a, **kw: "/opt/python3.11-debug/include" if key == "include" else real(key, *a, **kw))
    assert kernels.build_name() != name


@pytest.mark.parametrize("ext", EXTENSIONS, ids=lambda e: e.stem)
def test_two_checkouts_of_the_same_sources_share_one_build(ext, fake, tmp_path, monkeypatch):
    first = _load(ext, tmp_path)
    checkout = tmp_path / "second-checkout" / "csrc"
    shutil.copytree(kernels.CSRC, checkout)
    monkeypatch.setattr(kernels, "CSRC", checkout)
    assert _load(ext, tmp_path) == first and len(fake.builds) == 1  # the build compiles its own copy
    (checkout / ext.sources[0]).write_text((checkout / ext.sources[0]).read_text() + "\n// edited\n")
    edited = _load(ext, tmp_path)
    assert edited[0] != first[0] and len(fake.builds) == 2
    assert (tmp_path / edited[0] / ext.sources[0]).read_text().endswith("// edited\n")


@pytest.mark.parametrize("ext", EXTENSIONS, ids=lambda e: e.stem)
def test_a_build_is_announced_before_it_starts_with_its_expected_time(ext, fake, tmp_path, caplog):
    fake.log_text = lambda: caplog.text
    with caplog.at_level(logging.INFO, logger="fracpass.kernels"):
        _load(ext, tmp_path)
        _load(ext, tmp_path)
    assert len(fake.log_at_build) == 1
    assert f"building fracpass's {ext.title} (about {ext.build_s} s" in fake.log_at_build[0]
    assert caplog.text.count("building") == 1  # the cached one is loaded without a word


_HOLDER = r"""
import pathlib, sys, time
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton
from fracpass import kernels

def build_forever(name, sources, build_directory, **kwargs):  # a build under way: torch's lock taken
    FileBaton(str(pathlib.Path(build_directory) / "lock")).try_acquire()
    time.sleep(600)

cpp_extension.load = build_forever
kernels._build(kernels.build_name())
"""


def _wait_for(what, timeout):
    stop = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < stop, f"not within {timeout} s"
        time.sleep(0.05)


def test_a_live_builder_is_waited_for_by_name_and_its_lock_cleared_once_it_is_killed(fake, tmp_path, caplog):
    name = kernels.build_name()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    try:
        _wait_for(lambda: (tmp_path / name / "lock").exists() or holder.poll() is not None, 180)
        assert holder.poll() is None, "the holder process died before taking the lock"
        done = []
        with caplog.at_level(logging.INFO, logger="fracpass.kernels"):
            loader = threading.Thread(target=lambda: done.append(kernels._build(name)), daemon=True)
            loader.start()
            _wait_for(lambda: "waiting for pid" in caplog.text, 30)
            assert f"waiting for pid {holder.pid} on " in caplog.text and not done  # names who holds it
            holder.kill()
            holder.wait()
            killed = time.monotonic()
            loader.join(timeout=30)
            assert not loader.is_alive(), "the load still waits on the killed build's lock"
        assert time.monotonic() - killed < 10 and done == [f"module {name}"] and fake.builds == [name]
        assert f"removed a stale build lock {tmp_path / name / 'lock'}: its build (pid {holder.pid} on " in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_with_no_owner_is_removed_once_older_than_any_build(fake, tmp_path, caplog, monkeypatch):
    name = kernels.build_name()
    lock = tmp_path / name / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - kernels.STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.INFO, logger="fracpass.kernels"):
        start = time.monotonic()
        assert _load(kernels.QUANT, tmp_path)[0] == name and time.monotonic() - start < 10
    assert "with no owner on record, longer than any build takes" in caplog.text
    # a young one (a build outside fracpass's loader?) is waited for until that age, saying so
    caplog.clear()
    monkeypatch.setattr(kernels, "STALE_AFTER_S", 2)
    lock.touch()
    with caplog.at_level(logging.INFO, logger="fracpass.kernels"):
        start = time.monotonic()
        _load(kernels.QUANT, tmp_path)
        assert 1.5 <= time.monotonic() - start < 10
    assert "which no fracpass load holds: removing it if it is still there when 2 s old" in caplog.text
    assert "removed a stale build lock" in caplog.text and not lock.exists()


def test_fracpass_kernels_0_disables_both_extensions(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("built with FRACPASS_KERNELS=0")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("FRACPASS_KERNELS", "0")
    assert kernels.load() is None and kernels.load_native() is None and kernels._loaded == {}


def test_a_failed_build_is_said_once_and_leaves_the_torch_ops(tmp_path, monkeypatch, caplog):
    calls = []

    def no_compiler(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(kernels, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="fracpass.kernels"):
        assert kernels.load_native() is None and kernels.load_native() is None
    assert calls == [1]
    assert ("fracpass's native int8/bf16 CPU kernels unavailable (RuntimeError: Ninja is required to load C++ "
            "extensions); using torch ops") in caplog.text
