"""Keeps the heap memory a training step or a request frees inside the process, for the next one.

Why: torch allocates every activation, gradient and product with ``malloc``. glibc serves
blocks above its mmap threshold with fresh ``mmap`` pages and gives the top of the heap back to
the kernel once more than its trim threshold is free. Both thresholds adapt upwards at run time,
but not far enough for this workload: a default training step (batch 2048) still faulted
4,700-9,100 pages back in each time (18-36 MB zeroed by the kernel, 11-27 ms of system time of
a 55-65 ms step), and an eager 500-candidate forward pass 218 pages (0.6 ms). Raising both
thresholds to 1 GiB keeps freed blocks in the heap, where the next step finds them already
mapped: 40-110 faults per training step and none per forward pass
(``bench/allocator.py`` compares the two, with its command line in ``docs/performance.md``).

The cost: the process keeps its peak heap instead of returning the free part to the kernel;
memory the process needed once it keeps. ONNX Runtime's arena already works this way.

glibc only (Linux); elsewhere, or where ``mallopt`` refuses the values, nothing changes.
Chosen by the typed configs, ``glibc_malloc = "retain"`` (the default) or ``"default"``
(glibc's own behaviour, for a comparison or a host where returning memory matters more than
speed): ``training.glibc_malloc`` for the trainer, ``RANKER_GLIBC_MALLOC`` for the service.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Literal

log = logging.getLogger("ranker.allocator")

M_TRIM_THRESHOLD = -1  # <malloc.h>: free top-of-heap bytes kept before trimming
M_MMAP_THRESHOLD = -3  # <malloc.h>: requests at least this large get their own mmap
RETAIN_BYTES = 1 << 30

GlibcMalloc = Literal["retain", "default"]

_applied = False


def apply_glibc_malloc(choice: GlibcMalloc) -> bool:
    """The configured choice: ``True`` when freed memory is being retained afterwards.
    ``"default"`` changes nothing (and cannot undo an earlier ``"retain"`` in this process)."""
    return retain_freed_memory() if choice == "retain" else _applied


def retain_freed_memory(limit: int = RETAIN_BYTES) -> bool:
    """Sets glibc's mmap and trim thresholds to ``limit`` once per process; ``True`` when they
    are in effect (now or from an earlier call)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt to speak of)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, limit) and mallopt(M_TRIM_THRESHOLD, limit)):
        log.info("mallopt refused %d-byte thresholds: freed memory goes back to the kernel", limit)
        return False
    _applied = True
    return True
