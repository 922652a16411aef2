"""Giving the heap the model load freed back to the kernel (handler/engine/memory.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from handler.engine import Engine, EngineConfig, memory

BLOCK = 64 * 1024  # under glibc's mmap threshold, so the blocks come from the heap
BLOCKS = 1600  # 100 MiB freed


def rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.fixture
def fresh_lookup() -> Iterator[None]:
    memory._glibc.cache_clear()
    yield
    memory._glibc.cache_clear()


def test_freed_heap_pages_go_back_to_the_kernel(fresh_lookup: None) -> None:
    """Freed blocks between live ones stay resident (free() only trims the heap's top); the
    release hands them back."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(2 * BLOCKS)]
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)  # resident
    kept, freed = blocks[0::2], blocks[1::2]  # each freed block lies between two live ones
    for block in freed:
        libc.free(block)
    before = rss_anon_kib()

    assert memory.release_freed_heap() is True
    released_mib = (before - rss_anon_kib()) / 1024
    for block in kept:
        libc.free(block)

    assert released_mib > 50


def test_no_glibc_no_release(fresh_lookup: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory.release_freed_heap() is False


def test_the_load_releases_the_heap_unless_told_not_to(tiny_int8: Path) -> None:
    released = Engine.load(tiny_int8, EngineConfig(threads=1))
    kept = Engine.load(tiny_int8, EngineConfig(threads=1, release_heap=False))

    assert "release_heap" in released.load_timings_ms
    assert "release_heap" not in kept.load_timings_ms
    texts = ["what is the capital of France?", "BGE-M3 是一個嵌入模型。"]
    a = released.encode(texts, dense=True, sparse=True, colbert=True)
    b = kept.encode(texts, dense=True, sparse=True, colbert=True)
    assert a.dense is not None and b.dense is not None
    assert (a.dense == b.dense).all()
