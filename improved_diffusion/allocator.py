"""
Keep freed memory in the process instead of handing it back to the kernel.

A sampling step allocates and frees the same large activations (megabytes
each) again and again. With glibc's defaults, blocks that large are mapped
fresh for every allocation and unmapped when freed, and the heap's top is
trimmed, so each step pays the kernel to map and zero the same pages anew:
an ImageNet-128 SAG step on a CPU took up to 717,000 page faults and up to
11 % of its time in the kernel (benchmarks/RESULTS.md, "Page faults").
Raising glibc's mmap and trim thresholds lets freed blocks be reused: no
page faults after the first step, and no change to any number computed.

``keep_freed_memory()`` is called by every sampling run
(run.sample_run.sample_to_npz, so the sampling scripts, the demo and the
sweep); it does nothing where the C library is not glibc, and nothing when
the environment variable ``IMPROVED_DIFFUSION_MALLOPT`` is ``0``.
"""

import ctypes
import ctypes.util
import os
import sys

ENV = "IMPROVED_DIFFUSION_MALLOPT"

# glibc's mallopt() parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# The largest mmap threshold glibc accepts on 64-bit systems (half its heap
# size, 2 x DEFAULT_MMAP_THRESHOLD_MAX); larger blocks are still mapped.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

_done = None


def keep_freed_memory():
    """
    Set glibc's allocator to keep freed blocks of up to MMAP_THRESHOLD bytes
    and up to TRIM_THRESHOLD bytes of free heap top for reuse.

    :return: True when the settings were applied (now or by an earlier
             call), False when skipped (not glibc, or disabled by ENV).
    """
    global _done
    if _done is None:
        _done = _apply()
    return _done


def _apply():
    if os.environ.get(ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
