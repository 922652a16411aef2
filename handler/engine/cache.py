"""Identical inputs computed once: within one forward pass (a request, or a micro-batched group of
requests) and, optionally, across requests in an in-process LRU cache (EMBED_CACHE_SIZE).

Both are keyed by the token ids an input runs with, after truncation: the same text under the same
options tokenizes to the same ids, and the ids already say everything that changes the outputs
(`max_length`, truncation, the text itself). `dimensions` is applied after the cache and the other
options only choose among the heads. One cache belongs to one Engine, so the model (its graph's
sha256) is part of every key by construction; the digest is stored with the cache all the same,
so that a cache can never be handed to another model by mistake.

ColBERT rows are not cached: one input's rows take tokens x 4 KiB (32 MiB at 8192 tokens), which
would let a few entries dwarf the rest of the process. A request for ColBERT vectors of a cached
text is a miss and runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float32]
Key = tuple[int, ...]

# Where a row's outputs came from (Encoded.sources).
COMPUTED, SHARED, CACHED = "computed", "shared", "cached"


@dataclass(frozen=True)
class Entry:
    dense: FloatArray | None
    sparse: dict[int, float] | None

    def covers(self, dense: bool, sparse: bool, colbert: bool) -> bool:
        return (
            not colbert
            and (not dense or self.dense is not None)
            and (not sparse or self.sparse is not None)
        )


class EmbedCache:
    """A thread-safe LRU of per-input outputs of one model, `size` entries at most."""

    def __init__(self, size: int, model_digest: str):
        if size < 1:
            raise ValueError("a cache needs room for at least one entry")
        self.size = size
        self.model_digest = model_digest
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key, dense: bool, sparse: bool, colbert: bool) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.covers(dense, sparse, colbert):
                return None
            self._entries.move_to_end(key)
            return entry

    def put(self, key: Key, dense: FloatArray | None, sparse: dict[int, float] | None) -> None:
        if dense is None and sparse is None:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:  # keep the heads an earlier request computed
                dense = dense if dense is not None else old.dense
                sparse = sparse if sparse is not None else old.sparse
            self._entries[key] = Entry(dense.copy() if dense is not None else None, sparse)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def first_occurrences(keys: list[Key]) -> list[int]:
    """For each row, the index of the first row with the same key (itself when it is first)."""
    seen: dict[Key, int] = {}
    return [seen.setdefault(key, index) for index, key in enumerate(keys)]
