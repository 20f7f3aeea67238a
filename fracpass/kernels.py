"""fracpass's compiled CPU kernels, built once on first use: the quantizers' (``csrc/quant_cpu.cpp``,
``load()``) and native execution's (``csrc/native_*.cpp``, ``load_native()``).

The quantizer kernels do the quantizer's elementwise work in one pass after ``torch.aminmax``: 0.6 ms
instead of 1.1 ms per 2M-float fake quantization, and 0.7 ms instead of 5.6 ms for stochastic
rounding, on this project's 2-core CI machines. The native kernels make and read the int8 / bf16 codes
around native execution's products (``fracpass.native``). They cover contiguous float32 CPU tensors;
every other case (CUDA, half precision, strided tensors) takes the torch-op paths, which compute the
same values.

The first use compiles an extension with torch's JIT builder (needs a C++ compiler and ninja): on two
idle cores about 30 s for the quantizers' and 2-3 min for the native kernels' (seven files), more on a
busy machine. The build is announced in the log before it starts, with that time, and cached
under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Each build is named after a
hash of its sources, the flags, the torch version and the environment it is built in (``environment()``:
the compiler, torch's and Python's header and library folders, everything ``build.ninja`` holds besides
the sources) and compiles a copy of its sources kept in its own build directory: installs that share
the cache (two venvs, two checkouts) share a build when they would build the same thing, and keep one
each otherwise, instead of rebuilding each other's on every switch.

A build killed midway leaves torch's ``lock`` file behind, on which every later load would wait forever.
So every load holds an exclusive ``flock`` on ``fracpass.owner`` in the build directory (the kernel drops
it when its holder dies) and writes who holds it there; a load that finds the ``flock`` taken says who
holds it and waits, and one that takes it and finds a ``lock`` left by a holder that died removes it and
says so (``_exclusive``).

Set ``FRACPASS_KERNELS=0`` to never build or use them; a failed build logs a warning once and falls
back to torch ops.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

log = logging.getLogger("fracpass.kernels")

CSRC = pathlib.Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]  # -fopenmp: at::parallel_for is serial without it; GOMP symbols resolve to torch's loaded libgomp


@dataclass(frozen=True)
class Extension:
    """One compiled extension: its build name's stem, its files in ``csrc/`` (the sources compiled and
    the headers they include: all copied into the build directory and hashed into the build's name),
    what the log calls it and about how long a build takes on two idle cores."""

    stem: str
    sources: Tuple[str, ...]
    headers: Tuple[str, ...]
    title: str
    build_s: int

    def files(self) -> Tuple[str, ...]:
        return self.sources + self.headers


# dither.h: stochastic rounding's dither, which both must compute bit for bit alike
QUANT = Extension("fracpass_quant_cpu", ("quant_cpu.cpp",), ("dither.h",), "fused CPU quantizer kernels", 30)
NATIVE = Extension("fracpass_native_cpu",
                   tuple(f"native_{part}.cpp" for part in ("codes", "grad_codes", "epilogue", "relu", "conv", "batchnorm",
                                                            "module")),
                   ("native_common.h", "dither.h"), "native int8/bf16 CPU kernels",
                   150)  # seven files, each parsing torch/extension.h: ~5 min of compiler time measured here

NAME = QUANT.stem  # the stem of build_name()
SOURCE = CSRC / QUANT.sources[0]
OWNER = "fracpass.owner"  # in a build directory: flock-ed by the load working there, with who it is
STALE_AFTER_S = 1800  # a torch lock with no owner on record is taken for a killed build's when this old

_lock = threading.Lock()
_loaded: Dict[str, Any] = {}  # Extension.stem -> module, or None when its build failed


def enabled() -> bool:
    return os.environ.get("FRACPASS_KERNELS", "1") not in ("0", "false", "no", "off")


def source_text(extension: Extension = QUANT) -> str:
    """The text of ``extension``'s files, what its build name hashes: a one-file extension's source as it
    is, several files' each after its name."""
    files = extension.files()
    if len(files) == 1:
        return (CSRC / files[0]).read_text()
    return "".join(f"\0{name}\0{(CSRC / name).read_text()}" for name in files)


def environment() -> Tuple[str, ...]:
    """What torch's ``build.ninja`` holds besides the sources and the flags: the C++ compiler, torch's
    header and library folders, Python's header folder, and the Python ABI the module is built for.
    Builds made where any of these differ cannot share a build directory (ninja would rebuild on every
    switch); where they all match, one build serves both (two venvs over one torch, two checkouts)."""
    import sysconfig

    from torch.utils import cpp_extension

    return (f"cxx={cpp_extension.get_cxx_compiler()}",
            *(f"include={p}" for p in cpp_extension.include_paths("cpu")),
            *(f"lib={p}" for p in cpp_extension.library_paths("cpu")),
            f"python_include={sysconfig.get_path('include', scheme='posix_prefix')}",
            f"abi={sys.implementation.cache_tag}{sys.abiflags}")


def build_name(source: Optional[str] = None, flags: Sequence[str] = FLAGS, torch_version: Optional[str] = None,
               env: Optional[Sequence[str]] = None, extension: Extension = QUANT) -> str:
    """``extension.stem`` plus a hash of its sources (``source_text``), the compiler flags, the torch
    version and the build environment (``environment()``), by default this install's: what the build is
    cached under."""
    if source is None:
        source = source_text(extension)
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    if env is None:
        env = environment()
    key = json.dumps([source, list(flags), torch_version, list(env)])
    return f"{extension.stem}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _copy_sources(extension: Extension, build_dir: pathlib.Path) -> list:
    """Copies ``extension``'s files into ``build_dir`` where they differ; returns the sources' paths there."""
    for name in extension.files():
        target, text = build_dir / name, (CSRC / name).read_text()
        if not target.exists() or target.read_text() != text:
            # via a temporary file: another process may be reading it; rewriting unchanged text would
            # touch its mtime and make ninja rebuild
            tmp = build_dir / f".{name}.{os.getpid()}"
            tmp.write_text(text)
            os.replace(tmp, target)
    return [str(build_dir / name) for name in extension.sources]


def _out_of_date(build_dir: pathlib.Path) -> bool:
    """Whether ninja would rebuild anything in ``build_dir``'s earlier build (a dry run); False if unknown."""
    if not (build_dir / "build.ninja").exists():
        return False
    try:
        done = subprocess.run(["ninja", "-C", str(build_dir), "-n"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "no work to do" not in done.stdout


def _owner_line(text: str) -> str:
    return text.strip() or "another process (which has not yet written its name)"


@contextlib.contextmanager
def _exclusive(build_dir: pathlib.Path, extension: Extension) -> Iterator[None]:
    """Holds ``build_dir``'s build lock: an exclusive ``flock`` on its ``OWNER`` file, which says who holds
    it (pid, host, since when) and is emptied on release. The kernel drops a ``flock`` when its holder
    dies, so a holder is alive; and every fracpass load works inside this lock, so a torch ``lock`` file
    found by the holder was left by a build that died: if the owner file names the dead holder, or there is
    none and the lock is older than ``STALE_AFTER_S``, it is removed (else waited for, saying so)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    path = build_dir / OWNER
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _owner_line(os.pread(fd, 4096, 0).decode(errors="replace"))
            log.warning("waiting for %s, which holds the build lock of fracpass's %s in %s", holder, extension.title,
                        build_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock (some network mounts): torch's lock alone
            log.info("no flock in %s (%s): building under torch's lock alone", build_dir, e)
            yield
            return
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        _clear_stale_lock(build_dir / "lock", previous)
        os.ftruncate(fd, 0)
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # released cleanly: nothing left on record
        os.close(fd)  # drops the flock


def _clear_stale_lock(lock: pathlib.Path, previous: str) -> None:
    """Removes torch's ``lock`` left by a dead build (see ``_exclusive``); ``previous``: the owner file's
    text when the flock was taken (a holder that died leaves its line there)."""
    waited = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if previous or age > STALE_AFTER_S:
            why = (f"its build ({previous}) was killed midway" if previous else
                   f"it is {age:.0f} s old with no owner on record, longer than any build takes")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            log.warning("removed a stale build lock %s: %s, and torch would have waited on it forever", lock, why)
            return
        if not waited:
            log.warning("waiting on the build lock %s (%.0f s old), which no fracpass load holds: removing it if "
                        "it is still there when %d s old (delete it by hand if no build is running)", lock, age,
                        STALE_AFTER_S)
            waited = True
        time.sleep(0.5)


def _build(name: str, extension: Extension = QUANT) -> Any:
    """Load (building if needed) ``extension`` as ``name`` from a copy of its sources in its build directory."""
    from torch.utils import cpp_extension

    build_dir = pathlib.Path(cpp_extension._get_build_directory(name, False))
    library = build_dir / f"{name}.so"
    with _exclusive(build_dir, extension):
        sources = _copy_sources(extension, build_dir)
        before = library.stat().st_mtime_ns if library.exists() else None
        if before is None:
            log.warning("building fracpass's %s (about %d s on two idle cores, minutes on a busy machine; once per "
                        "source, flags, torch version and environment; cached in %s)", extension.title,
                        extension.build_s, build_dir)
        elif _out_of_date(build_dir):
            log.warning("rebuilding fracpass's %s in %s: the cached build is out of date (about %d s on two idle "
                        "cores)", extension.title, build_dir, extension.build_s)
            before = -1  # announced
        start = time.perf_counter()
        module = cpp_extension.load(name, sources, extra_cflags=FLAGS, build_directory=str(build_dir), verbose=False)
        elapsed = time.perf_counter() - start
    if before is not None and before != -1 and library.exists() and library.stat().st_mtime_ns != before:
        log.warning("rebuilt fracpass's %s in %s (%.1f s): the cached build was out of date", extension.title,
                    build_dir, elapsed)
    log.info("fracpass's %s ready (%.1f s)", extension.title, elapsed)
    return module


def load(extension: Extension = QUANT) -> Optional[Any]:
    """``extension``'s compiled module (by default the quantizer kernels), building it on first call; None
    if disabled (``FRACPASS_KERNELS=0``) or it cannot be built."""
    if not enabled():
        return None
    if extension.stem in _loaded:
        return _loaded[extension.stem]
    with _lock:
        if extension.stem in _loaded:
            return _loaded[extension.stem]
        try:
            module = _build(build_name(extension=extension), extension)
        except Exception as e:  # no compiler, no ninja, read-only cache...: the torch-op path still works
            log.warning("fracpass's %s unavailable (%s: %s); using torch ops, which are slower. Install a C++ "
                        "compiler and ninja, or set FRACPASS_KERNELS=0 to silence this.", extension.title,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            module = None
        _loaded[extension.stem] = module
    return module


def load_native() -> Optional[Any]:
    """The native execution kernels (``NATIVE``: codes, gradient codes, epilogues, BatchNorm...), as ``load``."""
    return load(NATIVE)
