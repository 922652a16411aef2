"""Deliberate damage (`--fault-inject`, a hidden test hook): builds that the gate must refuse.

- `int8-weight-scale` (model_build/quantize.py): every int8 weight scale off by a factor;
- `sparse-head`: noise on the sparse head's weights after the reference ran, so the exported
  model's lexical weights are wrong while its dense and ColBERT outputs are untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_build.errors import BuildError

if TYPE_CHECKING:
    from model_build.recipes import LoadedModel

# Noise on each sparse-head weight, as a share of the mean |weight|: a head about as far off as a
# carelessly quantized one, not a zeroed one.
SPARSE_HEAD_NOISE = 0.5
SPARSE_HEAD_SEED = 1234


def damage_sparse_head(model: LoadedModel) -> None:
    import torch

    head = getattr(model.module, "sparse_linear", None)
    if not isinstance(head, torch.nn.Linear):
        raise BuildError("--fault-inject sparse-head needs a model with a sparse head (bge-m3)")
    generator = torch.Generator().manual_seed(SPARSE_HEAD_SEED)
    with torch.no_grad():
        weight = head.weight
        noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
        weight.add_(noise * SPARSE_HEAD_NOISE * weight.abs().mean())
