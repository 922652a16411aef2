"""Stage validate, the fidelity gate: the staged artifact as the server runs it, against the fp32
PyTorch reference (the unsmoothed torch model with the same heads) on the validation set.

The candidate is loaded by the runtime engine itself (`Engine.load` on the staging directory): the
manifest the server reads, the sha256 check of every file, the same session options, tokenizer,
length-sorted batching and head post-processing. The reference's raw outputs go through the
engine's own batching and head functions (handler/engine/batching.py, heads.py), so the two sides
differ only in the model. The digests the engine verified are recorded: the gated bytes are the
served bytes.

Figures: dense cosine (min, mean); sparse (model_build/lexical.py: lexical match score error over
query-passage pairs, weighted overlap of each text's heaviest tokens); ColBERT mean cosine (over
real rows, then over texts); the 5 worst texts. A model below any threshold fails the build.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer

from handler.engine import heads
from handler.engine.batching import pad, plan_batches
from handler.engine.manifest import (
    ColbertFigures,
    DenseFigures,
    GateFigures,
    GateSession,
    TextScore,
    Thresholds,
    ValidationSection,
)
from handler.engine.types import Encoded
from model_build import lexical
from model_build.errors import BuildError
from model_build.progress import Progress

if TYPE_CHECKING:
    import torch

    from handler.engine.engine import Engine

__all__ = ["Thresholds"]

DATA_DIR = Path(__file__).parent / "data"
VALIDATION_SET = DATA_DIR / "validation.jsonl"
CALIBRATION_SET = DATA_DIR / "calibration.jsonl"
# A query is a text's opening words: as long as a search query, sharing some tokens with its own
# text and few with the others, so the pairs cover both strong and weak matches.
QUERY_CHARS = 48
# Padded tokens per reference batch: bounded memory for eager attention (batch x heads x S x S)
# on the full-size model, and a progress line every few batches.
REFERENCE_TOKEN_BUDGET = 4096
REFERENCE_MAX_BATCH = 32
ENGINE_CHUNK_TEXTS = 32  # texts per engine call: a progress line per chunk

FloatArray = NDArray[np.float32]
T = TypeVar("T")


@dataclass(frozen=True)
class TextItem:
    lang: str
    text: str


@dataclass
class EncodedSet:
    items: list[TextItem]
    ids: list[list[int]]
    truncated: int  # how many texts were cut to max_length

    @property
    def lengths(self) -> list[int]:
        return [len(i) for i in self.ids]

    @property
    def texts(self) -> list[str]:
        return [i.text for i in self.items]


def load_text_set(path: Path) -> list[TextItem]:
    if not path.is_file():
        raise BuildError(f"{path}: text set not found")
    items: list[TextItem] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(TextItem(lang=str(row["lang"]), text=str(row["text"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise BuildError(f'{path}:{number}: expected {{"lang", "text"}} JSON ({exc})') from exc
    if not items:
        raise BuildError(f"{path}: no texts")
    return items


def query_of(text: str) -> str:
    """A text's opening words, cut at a space when there is one (else at QUERY_CHARS)."""
    head = text.strip()[: QUERY_CHARS + 1]
    if len(head) <= QUERY_CHARS:
        return head
    cut = head.rfind(" ")
    return head[:cut] if cut > QUERY_CHARS // 2 else head[:QUERY_CHARS]


def with_queries(items: list[TextItem]) -> list[TextItem]:
    """The texts, then one query per text (the gate's lexical pairs are queries x texts)."""
    return [*items, *(TextItem(lang=i.lang, text=query_of(i.text)) for i in items)]


def encode_set(items: list[TextItem], tokenizer: Tokenizer) -> EncodedSet:
    """`tokenizer` truncates (PreparedTokenizer.truncating)."""
    encodings = tokenizer.encode_batch([i.text for i in items])
    ids = [list(e.ids) for e in encodings]
    truncated = sum(1 for e in encodings if e.overflowing)
    return EncodedSet(items=items, ids=ids, truncated=truncated)


# ---- the two sides --------------------------------------------------------------------------


def run_reference(
    module: torch.nn.Module,
    ids: Sequence[Sequence[int]],
    output_names: Sequence[str],
    special_tokens: Mapping[str, int],
    progress: Progress,
    stage: str = "reference",
) -> Encoded:
    """The torch model on `ids`, batched and post-processed by the engine's own functions."""
    import torch

    lengths = [len(s) for s in ids]
    n, drop, pad_id = len(ids), set(special_tokens.values()), special_tokens["pad"]
    dense: list[FloatArray] = [np.empty(0, np.float32)] * n
    sparse: list[dict[int, float]] = [{} for _ in range(n)]
    colbert: list[FloatArray] = [np.empty(0, np.float32)] * n
    batches = plan_batches(lengths, REFERENCE_TOKEN_BUDGET, REFERENCE_MAX_BATCH)
    done_texts = done_tokens = 0
    for number, batch in enumerate(batches, start=1):
        input_ids, mask = pad([ids[i] for i in batch], pad_id)
        with torch.inference_mode():
            out = module(torch.from_numpy(input_ids), torch.from_numpy(mask))
        tensors = out if isinstance(out, tuple) else (out,)
        named = dict(zip(output_names, (t.float().numpy() for t in tensors), strict=True))
        for row, i in enumerate(batch):
            dense[i] = named["dense"][row]
            if "sparse" in named:
                weights = named["sparse"][row, : lengths[i]]
                sparse[i] = heads.sparse_weights(input_ids[row, : lengths[i]], weights, drop)
            if "colbert" in named:
                colbert[i] = heads.colbert_rows(named["colbert"][row], lengths[i])
        done_texts += len(batch)
        done_tokens += sum(lengths[i] for i in batch)
        progress.tick(
            stage,
            f"torch fp32: {done_texts}/{n} texts, {done_tokens}/{sum(lengths)} tokens "
            f"(batch {number}/{len(batches)}, {len(batch)}x{input_ids.shape[1]})",
            force=number == len(batches),
        )
    has_heads = set(output_names)
    return Encoded(
        dense=np.stack(dense).astype(np.float32) if n else np.zeros((0, 0), np.float32),
        sparse=sparse if "sparse" in has_heads else None,
        colbert=colbert if "colbert" in has_heads else None,
        token_counts=lengths,
    )


def load_served(model_dir: Path) -> Engine:
    """The artifact loaded as the server loads it (sha256 of every file checked)."""
    from handler.engine.engine import Engine, EngineConfig

    return Engine.load(model_dir, EngineConfig(verify="sha256", warmup=False))


def gate_session(engine: Engine) -> GateSession:
    config = engine.config
    return GateSession(
        loader="handler.engine.engine.Engine.load",
        provider=str(engine.session.get_providers()[0]),
        threads=engine.threads,
        batch_token_budget=config.batch_token_budget,
        attention_square_budget=config.attention_square_budget,
        max_batch_size=config.max_batch_size,
    )


def tokenizer_mismatches(engine: Engine, encoded: EncodedSet) -> list[int]:
    """Texts the served tokenizer splits otherwise than the build's (the reference's input)."""
    served = engine.tokenize(encoded.texts)
    return [i for i, (a, b) in enumerate(zip(served, encoded.ids, strict=True)) if a != b]


def run_engine(engine: Engine, texts: Sequence[str], progress: Progress, label: str) -> Encoded:
    """engine.encode over every head the model has, a chunk of texts at a time."""
    parts: list[Encoded] = []
    asked = {h: True for h in engine.available_heads}
    for start in range(0, len(texts), ENGINE_CHUNK_TEXTS):
        parts.append(engine.encode(texts[start : start + ENGINE_CHUNK_TEXTS], **asked))
        done = min(start + ENGINE_CHUNK_TEXTS, len(texts))
        progress.tick("validate", f"{label}: {done}/{len(texts)} texts", force=done == len(texts))
    return _concat(parts)


def _concat(parts: Sequence[Encoded]) -> Encoded:
    dense = [p.dense for p in parts if p.dense is not None]
    return Encoded(
        dense=np.concatenate(dense) if dense else None,
        sparse=_joined([p.sparse for p in parts]),
        colbert=_joined([p.colbert for p in parts]),
        token_counts=[c for p in parts for c in p.token_counts],
    )


def _joined(lists: Sequence[list[T] | None]) -> list[T] | None:
    """One list from a head's per-chunk lists (None: the head was not asked for)."""
    if not lists or lists[0] is None:
        return None
    return [x for part in lists for x in part or []]


# ---- the comparison -------------------------------------------------------------------------


def _cosine(a: FloatArray, b: FloatArray) -> float:
    na = float(np.linalg.norm(a))
    nb = float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)) / (na * nb))


def _row_cosines(a: FloatArray, b: FloatArray) -> FloatArray:
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    na = np.linalg.norm(a64, axis=1)
    nb = np.linalg.norm(b64, axis=1)
    denom = na * nb
    dots = (a64 * b64).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    return np.where(both_zero, 1.0, cos).astype(np.float32)


def compare(
    probe: EncodedSet,
    n_texts: int,
    reference: Encoded,
    candidate: Encoded,
    thresholds: Thresholds,
) -> ValidationSection:
    """Figures of the candidate against the reference. `probe` is the texts, then (for models
    with a sparse head) one query per text; dense and ColBERT figures are over the texts."""
    assert reference.dense is not None and candidate.dense is not None
    scores: list[TextScore] = []
    overlaps: list[float | None] = [None] * n_texts
    colbert: list[float | None] = [None] * n_texts
    for i in range(n_texts):
        if reference.sparse is not None and candidate.sparse is not None:
            overlaps[i] = lexical.top_overlap(reference.sparse[i], candidate.sparse[i])
        if reference.colbert is not None and candidate.colbert is not None:
            rows = _row_cosines(reference.colbert[i], candidate.colbert[i])
            colbert[i] = float(rows.mean()) if rows.size else 1.0
        scores.append(
            TextScore(
                index=i,
                lang=probe.items[i].lang,
                tokens=probe.lengths[i],
                dense_cosine=_cosine(reference.dense[i], candidate.dense[i]),
                sparse_top_overlap=overlaps[i],
                colbert_cosine=colbert[i],
                text=probe.items[i].text,
            )
        )
    dense = np.array([s.dense_cosine for s in scores], dtype=np.float64)
    figures = GateFigures(
        dense=DenseFigures(
            cosine_min=round(float(dense.min()), 6), cosine_mean=round(float(dense.mean()), 6)
        )
    )
    checks: list[tuple[str, float, float, bool]] = [  # name, value, limit, higher is better
        ("dense_cosine_min", figures.dense.cosine_min, thresholds.min_dense_cosine, True),
        ("dense_cosine_mean", figures.dense.cosine_mean, thresholds.min_dense_mean, True),
    ]
    if reference.sparse is not None and candidate.sparse is not None:
        sparse = lexical.sparse_figures(
            reference.sparse[:n_texts],
            candidate.sparse[:n_texts],
            reference.sparse[n_texts:],
            candidate.sparse[n_texts:],
        )
        figures = GateFigures(dense=figures.dense, sparse=sparse)
        checks.append(("lexical_error", sparse.lexical_error, thresholds.max_lexical_error, False))
        checks.append(
            (
                "sparse_top_overlap_mean",
                sparse.top_overlap_mean,
                thresholds.min_sparse_overlap,
                True,
            )
        )
    if reference.colbert is not None and candidate.colbert is not None:
        values = np.array([c for c in colbert if c is not None], dtype=np.float64)
        figures = GateFigures(
            dense=figures.dense,
            sparse=figures.sparse,
            colbert=ColbertFigures(
                cosine_mean=round(float(values.mean()), 6), cosine_min=round(float(values.min()), 6)
            ),
        )
        assert figures.colbert is not None
        checks.append(
            ("colbert_cosine_mean", figures.colbert.cosine_mean, thresholds.min_colbert_mean, True)
        )
    failures = tuple(_failures(checks))
    return ValidationSection(
        passed=not failures,
        figures=figures,
        thresholds=thresholds,
        failures=failures,
        worst_texts=tuple(_worst(scores)),
        texts=n_texts,
        queries=len(probe.ids) - n_texts,
        tokens=sum(probe.lengths[:n_texts]),
        truncated_texts=probe.truncated,
        longest_text_tokens=max(probe.lengths[:n_texts]),
        languages=tuple(sorted({i.lang for i in probe.items[:n_texts]})),
    )


def _failures(checks: Sequence[tuple[str, float, float, bool]]) -> list[str]:
    failures = []
    for name, value, limit, higher_is_better in checks:
        bad = value < limit if higher_is_better else value > limit
        if bad or np.isnan(value):
            failures.append(f"{name} {value:.6f} {'<' if higher_is_better else '>'} {limit}")
    return failures


def _worst(scores: Sequence[TextScore], count: int = 5) -> list[TextScore]:
    def badness(s: TextScore) -> tuple[float, float, float]:
        return (
            s.dense_cosine,
            s.sparse_top_overlap if s.sparse_top_overlap is not None else 1.0,
            s.colbert_cosine if s.colbert_cosine is not None else 1.0,
        )

    worst = []
    for s in sorted(scores, key=badness)[:count]:
        worst.append(
            TextScore(
                index=s.index,
                lang=s.lang,
                tokens=s.tokens,
                dense_cosine=round(s.dense_cosine, 6),
                sparse_top_overlap=None
                if s.sparse_top_overlap is None
                else round(s.sparse_top_overlap, 6),
                colbert_cosine=None if s.colbert_cosine is None else round(s.colbert_cosine, 6),
                text=s.text if len(s.text) <= 80 else s.text[:77] + "...",
            )
        )
    return worst


def format_figures(figures: GateFigures) -> str:
    parts = [f"dense cosine min {figures.dense.cosine_min:.5f}"]
    parts.append(f"mean {figures.dense.cosine_mean:.5f}")
    if figures.sparse is not None:
        parts.append(f"lexical score error {figures.sparse.lexical_error:.5f}")
        parts.append(
            f"top-{figures.sparse.top_k} token overlap {figures.sparse.top_overlap_mean:.4f}"
        )
        parts.append(f"(top-5 identical {figures.sparse.top5_identical:.3f}, informative)")
    if figures.colbert is not None:
        parts.append(f"ColBERT mean cosine {figures.colbert.cosine_mean:.5f}")
    return ", ".join(parts)
