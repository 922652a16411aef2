"""Stage 5, the fidelity gate: the built ONNX model (onnxruntime, CPU) against the fp32 PyTorch
reference (the unsmoothed torch model with the same heads) on the validation set.

Figures: dense cosine (min, mean); sparse top-5 agreement (per text, the 5 heaviest token ids after
the engine's post-processing, max weight per id, specials and weights <= 0 dropped, compared as
sets); ColBERT mean cosine (over real rows, then over texts); the 5 worst texts. A model below any
threshold fails the build.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer

from model_build.errors import BuildError
from model_build.progress import Progress

if TYPE_CHECKING:
    import torch

DATA_DIR = Path(__file__).parent / "data"
VALIDATION_SET = DATA_DIR / "validation.jsonl"
CALIBRATION_SET = DATA_DIR / "calibration.jsonl"
TOP_K = 5

FloatArray = NDArray[np.float32]
Outputs = dict[str, FloatArray]  # per text, unpadded: dense [d], sparse [n], colbert [n-1, d]


@dataclass(frozen=True)
class Thresholds:
    min_dense_cosine: float = 0.99
    min_dense_mean: float = 0.997
    min_sparse_top5: float = 0.90
    min_colbert_mean: float = 0.99


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


@dataclass
class TextScore:
    index: int
    lang: str
    tokens: int
    dense_cosine: float
    sparse_top5_match: bool | None = None
    sparse_top5_overlap: float | None = None  # |A & B| / |A | B|, informative only
    sparse_cosine: float | None = None  # of the lexical weight vectors, informative only
    colbert_cosine: float | None = None
    text: str = ""


@dataclass
class GateResult:
    passed: bool
    figures: dict[str, float]
    failures: list[str]
    worst: list[dict[str, Any]]
    texts: int
    tokens: int
    truncated: int
    thresholds: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "figures": self.figures,
            "thresholds": self.thresholds,
            "failures": self.failures,
            "worst_texts": self.worst,
            "texts": self.texts,
            "tokens": self.tokens,
            "truncated_texts": self.truncated,
            **self.extra,
        }


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


def encode_set(items: list[TextItem], tokenizer: Tokenizer) -> EncodedSet:
    """`tokenizer` truncates (PreparedTokenizer.truncating)."""
    encodings = tokenizer.encode_batch([i.text for i in items])
    ids = [list(e.ids) for e in encodings]
    truncated = sum(1 for e in encodings if e.overflowing)
    return EncodedSet(items=items, ids=ids, truncated=truncated)


def length_batches(
    lengths: Sequence[int], *, max_tokens: int = 8192, max_batch: int = 32
) -> list[list[int]]:
    """Indices grouped by similar length (sorted, longest first) so padding stays small; each
    batch holds at most `max_tokens` padded tokens (one text always fits alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    width = max(len(row) for row in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for r, row in enumerate(ids):
        input_ids[r, : len(row)] = row
        mask[r, : len(row)] = 1
    return input_ids, mask


Runner = Callable[[NDArray[np.int64], NDArray[np.int64]], list[FloatArray]]


def run_batched(
    runner: Runner,
    encoded: EncodedSet,
    output_names: Sequence[str],
    pad_id: int,
    progress: Progress,
    label: str,
    stage: str = "validate",
) -> list[Outputs]:
    results: list[Outputs | None] = [None] * len(encoded.ids)
    lengths = encoded.lengths
    # 4096 padded tokens per batch: bounded memory for eager attention (batch x heads x S x S) on
    # the full-size model, and a progress line every few batches.
    batches = length_batches(lengths, max_tokens=4096)
    total_tokens = sum(lengths)
    done_tokens = 0
    done_texts = 0
    for number, batch in enumerate(batches, start=1):
        input_ids, mask = pad_batch([encoded.ids[i] for i in batch], pad_id)
        outputs = runner(input_ids, mask)
        named = dict(zip(output_names, outputs, strict=True))
        for row, index in enumerate(batch):
            n = lengths[index]
            per_text: Outputs = {"dense": np.asarray(named["dense"][row], dtype=np.float32)}
            if "sparse" in named:
                per_text["sparse"] = np.asarray(named["sparse"][row, :n], dtype=np.float32)
                per_text["colbert"] = np.asarray(named["colbert"][row, : n - 1], dtype=np.float32)
            results[index] = per_text
        done_tokens += sum(lengths[i] for i in batch)
        done_texts += len(batch)
        progress.tick(
            stage,
            f"{label}: {done_texts}/{len(encoded.ids)} texts, "
            f"{done_tokens}/{total_tokens} tokens (batch {number}/{len(batches)}, "
            f"{len(batch)}x{input_ids.shape[1]})",
            force=number == len(batches),
        )
    return [r for r in results if r is not None]


def torch_runner(module: torch.nn.Module) -> Runner:
    import torch

    def run(input_ids: NDArray[np.int64], mask: NDArray[np.int64]) -> list[FloatArray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(input_ids), torch.from_numpy(mask))
        tensors = out if isinstance(out, tuple) else (out,)
        return [t.float().numpy() for t in tensors]

    return run


def onnx_runner(session: Any) -> Runner:
    def run(input_ids: NDArray[np.int64], mask: NDArray[np.int64]) -> list[FloatArray]:
        outputs = session.run(None, {"input_ids": input_ids, "attention_mask": mask})
        return [np.asarray(o, dtype=np.float32) for o in outputs]

    return run


def make_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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


def lexical_weights(
    ids: Sequence[int], weights: FloatArray, specials: set[int]
) -> dict[int, float]:
    """The engine's sparse post-processing: max weight per id, specials and weights <= 0 dropped."""
    out: dict[int, float] = {}
    for token, weight in zip(ids, weights.tolist(), strict=True):
        if token in specials or weight <= 0.0:
            continue
        if weight > out.get(token, 0.0):
            out[token] = weight
    return out


def _lexical_cosine(a: dict[int, float], b: dict[int, float]) -> float:
    if not a and not b:
        return 1.0
    dot = sum(w * b.get(t, 0.0) for t, w in a.items())
    na = math.sqrt(sum(w * w for w in a.values()))
    nb = math.sqrt(sum(w * w for w in b.values()))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def top_ids(weights: dict[int, float], k: int = TOP_K) -> set[int]:
    ranked = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))
    return {token for token, _ in ranked[:k]}


def compare(
    encoded: EncodedSet,
    reference: list[Outputs],
    candidate: list[Outputs],
    *,
    recipe: str,
    specials: set[int],
    thresholds: Thresholds,
) -> GateResult:
    scores: list[TextScore] = []
    for index, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        ids = encoded.ids[index]
        score = TextScore(
            index=index,
            lang=encoded.items[index].lang,
            tokens=len(ids),
            dense_cosine=_cosine(ref["dense"], cand["dense"]),
            text=encoded.items[index].text,
        )
        if recipe == "bge-m3":
            ref_lex = lexical_weights(ids, ref["sparse"], specials)
            cand_lex = lexical_weights(ids, cand["sparse"], specials)
            ref_top, cand_top = top_ids(ref_lex), top_ids(cand_lex)
            score.sparse_top5_match = ref_top == cand_top
            union = ref_top | cand_top
            score.sparse_top5_overlap = len(ref_top & cand_top) / len(union) if union else 1.0
            score.sparse_cosine = _lexical_cosine(ref_lex, cand_lex)
            rows = _row_cosines(ref["colbert"], cand["colbert"])
            score.colbert_cosine = float(rows.mean()) if rows.size else 1.0
        scores.append(score)

    dense = np.array([s.dense_cosine for s in scores], dtype=np.float64)
    figures: dict[str, float] = {
        "dense_cosine_min": float(dense.min()),
        "dense_cosine_mean": float(dense.mean()),
    }
    checks: list[tuple[str, float, float]] = [
        ("dense_cosine_min", figures["dense_cosine_min"], thresholds.min_dense_cosine),
        ("dense_cosine_mean", figures["dense_cosine_mean"], thresholds.min_dense_mean),
    ]
    if recipe == "bge-m3":
        matches = [bool(s.sparse_top5_match) for s in scores]
        colbert = np.array([s.colbert_cosine for s in scores], dtype=np.float64)
        figures["sparse_top5_identical"] = sum(matches) / len(matches)
        figures["sparse_top5_overlap_mean"] = float(
            np.mean([s.sparse_top5_overlap for s in scores])
        )
        figures["sparse_cosine_mean"] = float(np.mean([s.sparse_cosine for s in scores]))
        figures["colbert_cosine_mean"] = float(colbert.mean())
        figures["colbert_cosine_min"] = float(colbert.min())
        checks.append(
            ("sparse_top5_identical", figures["sparse_top5_identical"], thresholds.min_sparse_top5)
        )
        checks.append(
            ("colbert_cosine_mean", figures["colbert_cosine_mean"], thresholds.min_colbert_mean)
        )
    failures = [
        f"{name} {value:.6f} < {limit}"
        for name, value, limit in checks
        if math.isnan(value) or value < limit
    ]

    def badness(s: TextScore) -> tuple[float, float, float]:
        return (
            s.dense_cosine,
            0.0 if s.sparse_top5_match is False else 1.0,
            s.colbert_cosine if s.colbert_cosine is not None else 1.0,
        )

    worst = []
    for s in sorted(scores, key=badness)[:5]:
        entry = {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(s).items()}
        entry["text"] = s.text if len(s.text) <= 80 else s.text[:77] + "..."
        worst.append(entry)
    used = {
        "min_dense_cosine": thresholds.min_dense_cosine,
        "min_dense_mean": thresholds.min_dense_mean,
    }
    if recipe == "bge-m3":
        used["min_sparse_top5"] = thresholds.min_sparse_top5
        used["min_colbert_mean"] = thresholds.min_colbert_mean
    return GateResult(
        passed=not failures,
        figures={k: round(v, 6) for k, v in figures.items()},
        failures=failures,
        worst=worst,
        texts=len(scores),
        tokens=sum(encoded.lengths),
        truncated=encoded.truncated,
        thresholds=used,
    )


def format_figures(result: GateResult) -> str:
    parts = [f"dense cosine min {result.figures['dense_cosine_min']:.5f}"]
    parts.append(f"mean {result.figures['dense_cosine_mean']:.5f}")
    if "sparse_top5_identical" in result.figures:
        parts.append(f"sparse top-5 identical {result.figures['sparse_top5_identical']:.3f}")
        parts.append(f"ColBERT mean cosine {result.figures['colbert_cosine_mean']:.5f}")
    return ", ".join(parts)
