"""Giving back the heap the model load freed.

Building a session parses the graph, copies initializers and pre-packs every int8 weight into
MLAS's layout; the parse buffers and unpacked copies are freed once the session exists, but glibc's
malloc keeps freed memory inside its heaps (and the thread arenas of the load and warm-up threads)
instead of returning it to the kernel, so it stays in the process's resident set. `malloc_trim(0)`
hands back every whole free page of every arena. Elsewhere (musl, macOS, Windows) there is no such
call and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from functools import cache
from typing import Any

log = logging.getLogger(__name__)


@cache
def _glibc() -> Any | None:
    """glibc, when this process runs on it (musl has no malloc_trim and no gnu_get_libc_version)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "malloc_trim"):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def release_freed_heap() -> bool:
    """Return the free pages of glibc's heaps to the kernel; True when glibc released any."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))
