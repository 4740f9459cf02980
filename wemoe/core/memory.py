"""Process memory policy for the command line: freed tensors go back to the OS.

glibc serves an allocation from its heap when it is below the mmap threshold, and
raises that threshold (up to 32 MiB) every time a larger mmapped block is freed.
A streaming merge frees thousands of multi-MB tensors, so after the first few
they all land in the heap, where fragmentation keeps freed memory resident (the
merge peak RSS rows of ``benchmarks/results/speed*.md`` measure the effect).
Pinning the threshold makes every tensor of 1 MiB or more its own mapping,
unmapped on free.

Only the ``wemoe`` command calls this; importing the library changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
THRESHOLD_BYTES = 1 << 20


def return_freed_memory_to_os(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold; False (and no change) on other C libraries or platforms."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


def memory_limit() -> int:
    """Bytes this process can hold at most: physical memory, or the address-space limit when one is set lower.

    Numbers a user gives (a batch size) and sizes a file claims are checked against it
    before anything is allocated, so a typo ends in one line instead of an allocation failure.
    """
    import os
    import resource

    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        limit = 1 << 50
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return min(limit, soft) if soft not in (resource.RLIM_INFINITY, -1) and soft > 0 else limit
