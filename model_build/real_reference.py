"""The real model's own outputs: lexical weights that BAAI/bge-m3 itself gave (FlagEmbedding's
BGEM3FlagModel, fp32, max_length 8192) for 11 texts, in reference/bge-m3/embeddings_ref.json.

The gate compares the built model with our own fp32 reference, which would pass a pipeline that
loads the weights wrongly in both. When the build's source is BAAI/bge-m3 at the pinned revision,
both are also held against these recorded weights: the fp32 reference must give them up to float
rounding, the built model within the gate's sparse limits. Any other source has other weights, and
the check is skipped with a line saying so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from handler.engine.manifest import RealModelCheck, SourceSection, Thresholds
from model_build import lexical
from model_build.errors import BuildError
from model_build.source import BGE_M3_REPO, PINNED_REVISION

REFERENCE_FILE = Path(__file__).parent / "reference" / "bge-m3" / "embeddings_ref.json"
# fp32 against fp32, the same weights: only summation order differs (kernels, threads, batches).
MAX_WEIGHT_ERROR_FP32 = 2e-3


@dataclass(frozen=True)
class RecordedWeights:
    sentences: list[str]
    weights: list[dict[int, float]]


def load_recorded(path: Path = REFERENCE_FILE) -> RecordedWeights:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        sentences = [str(s) for s in data["sentences"]]
        weights = [{int(t): float(w) for t, w in row.items()} for row in data["lexical_weights"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BuildError(
            f"{path}: not a reference of sentences and lexical weights ({exc})"
        ) from exc
    if len(sentences) != len(weights) or not sentences:
        raise BuildError(f"{path}: {len(sentences)} sentences but {len(weights)} weight maps")
    return RecordedWeights(sentences=sentences, weights=weights)


def skip_reason(source: SourceSection) -> str | None:
    """None when the recorded weights apply to this source; else why not."""
    if source.repo == BGE_M3_REPO and source.revision == PINNED_REVISION:
        return None
    where = source.label or "this source"
    return (
        f"{where} is not {BGE_M3_REPO}@{PINNED_REVISION[:12]}: the real model's recorded "
        "weights do not apply"
    )


def check(
    recorded: Sequence[Mapping[int, float]],
    fp32: Sequence[Mapping[int, float]],
    built: Sequence[Mapping[int, float]],
    thresholds: Thresholds,
    *,
    max_weight_error_fp32: float = MAX_WEIGHT_ERROR_FP32,
) -> RealModelCheck:
    """The fp32 reference's and the built model's weights for the recorded sentences, against
    the recorded ones. Refused: fp32 off by more than float rounding, or the built model outside
    the gate's sparse limits."""
    if not len(recorded) == len(fp32) == len(built):
        raise ValueError("one weight map per recorded sentence on every side")
    fp32_figures = lexical.agreement(recorded, fp32)
    built_figures = lexical.agreement(recorded, built)
    failures: list[str] = []
    if fp32_figures.max_weight_error > max_weight_error_fp32:
        failures.append(
            f"real model: the fp32 reference's weights are off by up to "
            f"{fp32_figures.max_weight_error:.6f} > {max_weight_error_fp32}"
        )
    if built_figures.lexical_error > thresholds.max_lexical_error:
        failures.append(
            f"real model: built lexical_error {built_figures.lexical_error:.6f} > "
            f"{thresholds.max_lexical_error}"
        )
    if built_figures.top_overlap_mean < thresholds.min_sparse_overlap:
        failures.append(
            f"real model: built sparse_top_overlap_mean {built_figures.top_overlap_mean:.6f} < "
            f"{thresholds.min_sparse_overlap}"
        )
    return RealModelCheck(
        passed=not failures,
        texts=len(recorded),
        max_weight_error_fp32=max_weight_error_fp32,
        fp32=fp32_figures,
        built=built_figures,
        failures=tuple(failures),
    )
