"""Length-sorted micro-batches under a padded-token budget, and padding.

Sorting by length keeps padding (wasted compute) low; the budgets bound a batch's activation
memory, since onnxruntime's arena keeps the high-water mark of the largest batch it has run:
- tokens (rows x longest) bound the activations, which grow linearly with length;
- rows x longest^2 bounds the attention scores of a padded batch, which the masked attention
  kernel materialises (heads x rows x S x S floats). An unpadded batch takes the tiled kernel,
  so a long text that runs alone never holds its S x S scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray


def plan_batches(
    lengths: Sequence[int], token_budget: int, max_batch: int, square_budget: int | None = None
) -> list[list[int]]:
    """Group input indices into batches whose padded size (rows x longest) fits `token_budget`
    and whose rows x longest^2 fits `square_budget` (None: no such limit).

    Longest first, so the first batch sets the arena's peak once; an input longer than a budget
    runs alone. Returns indices into `lengths`; callers restore input order from them.
    """
    if token_budget < 1 or max_batch < 1 or (square_budget is not None and square_budget < 1):
        raise ValueError("token_budget, max_batch and square_budget must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        length = max(lengths[i], 1)
        width, rows = max(longest, length), len(current) + 1
        if current and (
            width * rows > token_budget
            or rows > max_batch
            or (square_budget is not None and width * width * rows > square_budget)
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
