"""Host memory on a CPU run: freed blocks are kept for reuse instead of going back to the OS.

A CPU training step allocates its large tensors afresh every step: activations, logits,
log-probabilities and their gradients ([rows, vocabulary] fp32 runs to hundreds of MB). glibc's
malloc serves each block of 32 MB or more with its own mmap and unmaps it on free, so every step
faults all of those pages in again, each zeroed by the kernel. On 2 cores at the Multi30k task
shape that was ~30% of a janus step, more than its loss arithmetic (docs/performance.md, "Where
a CPU step's time goes"). Served from the heap and never trimmed, freed blocks are reused
without a fault. Not every time: torch's aligned allocations ask for a little more than the
block a tensor of the same size freed, so some still take fresh pages; over whole steps the gain
is measured in docs/performance.md. The cost: the process keeps its peak heap, which a training
process reaches every step anyway. CUDA memory has its own caching allocator and is not affected.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest free heap top kept (2 GB)


def _glibc(name: str):
    """The C library's function `name`, or None off Linux or where it has none (not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError):
        return None


def reuse_freed_memory() -> bool:
    """No mmap'd blocks, no trimming of the heap's free top below 2 GB. False where the C
    library has no mallopt: nothing changes there."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def release_freed_memory() -> None:
    """Hand the heap's free blocks back to the OS now (malloc_trim): a measurement of one
    block's peak memory (bench train's peak column) must not count what earlier ones freed."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
