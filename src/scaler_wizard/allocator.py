"""Keep a CPU run's resident memory close to what its tensors need (glibc only).

glibc's malloc serves requests above ``M_MMAP_THRESHOLD`` with ``mmap`` (returned to the OS on
free) and smaller ones from its heap arenas. The threshold is *dynamic* by default: every time a
large mmapped block is freed, the threshold rises to that block's size (up to 32 MiB on 64-bit),
so after the first training step most activation and logit buffers come from the arenas, where
freed memory stays resident and fragments. On a real 135M-parameter model at 2K tokens the whole
run peaked at 3.99 GB RSS with the default and 3.04 GB with a fixed 128 KiB threshold
(bench/probe_memory.py --real-run, BENCHMARKS.md "real packaged model"); the planner's estimate
assumes freed tensors leave.

Setting the threshold with ``mallopt`` also switches off the dynamic adjustment. A user who set
``MALLOC_MMAP_THRESHOLD_`` (or any ``MALLOC_*`` tunable) keeps their own choice; CUDA runs are
untouched (their tensors live in the caching allocator, not in malloc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
RUN_MMAP_THRESHOLD_BYTES = 128 * 1024


def tune_cpu_allocator(threshold_bytes: int = RUN_MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process; True when it was applied."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
