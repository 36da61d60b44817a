"""Keeping the C allocator from handing a conversion's temporaries back to the kernel after every piece.

Each converted piece allocates a few float32 temporaries of a few MiB and frees them. glibc's
malloc serves blocks that large with fresh ``mmap`` pages (or trims them off the heap on free),
so every piece pays a page fault per 4 KiB again: more kernel time than the quantization itself.
``keep_freed_blocks`` raises glibc's mmap and trim thresholds (``mallopt``) so that blocks under
``MMAP_THRESHOLD`` are reused from the heap; the process's resident memory then holds the peak of
those temporaries (a few tens of MiB per conversion thread) instead of returning it each time.
The setting lasts for the rest of the process (glibc offers no way to read the old values back).
Elsewhere than glibc it does nothing. It does not allocate, convert or limit memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # blocks under this come from the heap (glibc's own dynamic ceiling is 32 MiB)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # free heap top kept before it is returned to the kernel


@cache
def keep_freed_blocks() -> bool:
    """Set the thresholds once per process; True when glibc took them (False: not glibc, or refused)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt thresholds)
    except (OSError, AttributeError):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
