"""Process-wide allocator settings for training steps that allocate large blocks (glibc's malloc)."""
from __future__ import annotations

from typing import Optional

from fracpass.errors import FracpassError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_large_blocks(limit: int = 1 << 30) -> Optional[str]:
    """Keep glibc's malloc from handing large freed blocks back to the kernel, so that a training step
    reuses the last step's memory instead of faulting fresh pages in. Returns None when applied, else
    why not (the process then runs as before).

    glibc serves a block above its mmap threshold (adjusted at run time, at most 32 MB) with its own
    mapping and unmaps it on free, so the next such block costs a page fault and a zeroed page per
    4 KB on first touch. A d512 transformer step at batch 32 x 128 allocates 16 blocks of 33.5 MB (fc1's
    output, GELU's, and their gradients): 60-120 thousand page faults, about 100 ms of an 800 ms native
    step and of a 2 s FP32 one (bf16 autocast's halves of them stay under the threshold). ResNet-74's
    blocks at batch 128 stay under it (8 MB at most): no change there.

    This sets the mmap threshold and the heap's trim threshold to ``limit`` bytes (``mallopt``), for the
    whole process and every framework in it: blocks up to ``limit`` then come from the heap, and the
    heap keeps up to ``limit`` bytes of freed memory at its top instead of returning them, so the
    resident set stays near its peak. The heap grows to hold a step's blocks over the first steps
    (glibc's aligned allocations do not always fit a block just freed), then no page faults in (the
    transformer: 0-2 a step from the third). The same as starting Python with the environment
    ``MALLOC_MMAP_THRESHOLD_=<limit> MALLOC_TRIM_THRESHOLD_=<limit>``, which also covers what runs
    before fracpass is imported."""
    if type(limit) is not int or not 0 < limit < 2**31:
        raise FracpassError(f"reuse_large_blocks(limit={limit!r}): limit is a number of bytes, a positive int below "
                            "2**31 (mallopt's int); the default 1 << 30 keeps blocks up to 1 GiB on the heap")
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return (f"the C library here is not glibc ({platform.system()}, {platform.libc_ver()[0] or 'unknown'}): its "
                "allocator has other settings (e.g. jemalloc's or tcmalloc's, chosen at process start)")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError) as e:
        return f"glibc's mallopt could not be loaded ({e})"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, limit) != 1 or mallopt(_M_TRIM_THRESHOLD, limit) != 1:
        return f"glibc refused a threshold of {limit} bytes (mallopt returned 0)"
    return None
