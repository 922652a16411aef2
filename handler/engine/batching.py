"""Length-sorted micro-batches under a padded-token budget, and padding.

Sorting by length keeps padding (wasted compute) low; the budget bounds a batch's activation
memory, since onnxruntime's arena keeps the high-water mark of the largest batch it has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Group input indices into batches whose padded size (rows x longest) fits the budget.

    Longest first, so the first batch sets the arena's peak once; an input longer than the budget
    runs alone. Returns indices into `lengths`; callers restore input order from them.
    """
    if token_budget < 1 or max_batch < 1:
        raise ValueError("token_budget and max_batch must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        length = max(lengths[i], 1)
        if current and (
            max(longest, length) * (len(current) + 1) > token_budget or len(current) >= max_batch
        ):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def pad(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Right-pad to the longest sequence: (input_ids, attention_mask), both int64 as exported."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask
