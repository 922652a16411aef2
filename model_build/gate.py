"""The fidelity gate's run (stage validate): the staged artifact loaded by the runtime engine, as
the server loads it, compared with the fp32 reference (model_build/validate.py), then, for
BAAI/bge-m3 at the pinned revision, with the real model's recorded weights
(model_build/real_reference.py). A refused model raises GateFailedError with the figures."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from handler.engine.manifest import (
    RealModelCheck,
    SourceSection,
    Thresholds,
    ValidationSection,
)
from handler.engine.types import Encoded
from model_build import artifact, real_reference, validate
from model_build.errors import GateFailedError
from model_build.progress import Progress
from model_build.recipes import LoadedModel
from model_build.tokenizer import PreparedTokenizer

if TYPE_CHECKING:
    from handler.engine.engine import Engine


@dataclass
class RealModelInputs:
    """The recorded weights of the real model and our fp32 reference's for the same texts, or
    why the check does not apply."""

    skipped: str | None = None
    recorded: real_reference.RecordedWeights | None = None
    fp32: list[dict[int, float]] | None = None


def real_model_reference(
    source_section: SourceSection,
    model: LoadedModel,
    tok: PreparedTokenizer,
    max_length: int,
    progress: Progress,
) -> RealModelInputs:
    if "sparse" not in model.output_names:
        return RealModelInputs(skipped="the model has no sparse head")
    skipped = real_reference.skip_reason(source_section)
    if skipped is not None:
        progress.log("reference", f"real-model check skipped: {skipped}")
        return RealModelInputs(skipped=skipped)
    recorded = real_reference.load_recorded()
    items = [validate.TextItem(lang="ref", text=s) for s in recorded.sentences]
    with tok.truncating(max_length) as truncating:
        encoded = validate.encode_set(items, truncating)
    outputs = validate.run_reference(
        model.module, encoded.ids, model.output_names, tok.special_tokens, progress
    )
    assert outputs.sparse is not None
    return RealModelInputs(recorded=recorded, fp32=outputs.sparse)


def run(
    staging: Path,
    probe: validate.EncodedSet,
    n_texts: int,
    reference: Encoded,
    real: RealModelInputs,
    *,
    precision: str,
    thresholds: Thresholds,
    set_name: str,
    progress: Progress,
) -> ValidationSection:
    """The staged artifact, loaded as served, against the reference; raises GateFailedError."""
    started = time.time()
    try:
        engine = validate.load_served(staging)
        mismatched = validate.tokenizer_mismatches(engine, probe)
        candidate = None
        if not mismatched:
            label = f"served {precision} ({engine.threads} threads)"
            candidate = validate.run_engine(engine, probe.texts, progress, label)
    except Exception as exc:  # onnxruntime raises its own (untyped) exception classes
        if precision != "fp16":
            raise
        # The GPU image's fp16 graph may need kernels the CPU provider lacks: build it anyway,
        # say so, and record why it was not validated (never invented figures).
        cause = exc.__cause__ or exc
        first_line = (str(cause).splitlines() or [type(cause).__name__])[0]
        reason = (
            f"onnxruntime {artifact.tool_versions()['onnxruntime']} on CPU cannot run this fp16 "
            f"graph ({first_line}); validate it on a GPU"
        )
        progress.log("validate", f"SKIPPED: {reason}")
        return ValidationSection(passed=False, skipped=reason)
    if candidate is None:
        first = probe.texts[mismatched[0]]
        failure = (
            f"the served tokenizer splits {len(mismatched)} of {len(probe.ids)} texts otherwise "
            f"than the build's (first: {first[:60]!r})"
        )
        raise GateFailedError(
            f"fidelity gate failed for {precision}: {failure}",
            ValidationSection(passed=False, failures=(failure,)),
        )
    result = validate.compare(probe, n_texts, reference, candidate, thresholds)
    real_check = real_model_check(engine, real, thresholds, progress)
    result = replace(
        result,
        passed=result.passed and real_check.passed,
        failures=(*result.failures, *real_check.failures),
        real_model=real_check,
        set=set_name,
        gated_files={name: entry.sha256 for name, entry in engine.manifest.files.items()},
        session=validate.gate_session(engine),
        seconds=round(time.time() - started, 1),
    )
    del engine
    assert result.figures is not None
    progress.log("validate", validate.format_figures(result.figures))
    for entry in result.worst_texts:
        extra = ""
        if entry.colbert_cosine is not None:
            extra = f", colbert {entry.colbert_cosine:.5f}, top overlap {entry.sparse_top_overlap}"
        progress.log(
            "validate",
            f"  worst: dense {entry.dense_cosine:.5f}{extra} [{entry.lang}, "
            f"{entry.tokens} tok] {entry.text!r}",
        )
    if not result.passed:
        raise GateFailedError(
            f"fidelity gate failed for {precision}: {'; '.join(result.failures)}", result
        )
    progress.log("validate", "gate passed")
    return result


def real_model_check(
    engine: Engine, real: RealModelInputs, thresholds: Thresholds, progress: Progress
) -> RealModelCheck:
    if real.recorded is None or real.fp32 is None:
        return RealModelCheck(skipped=real.skipped)
    built = validate.run_engine(engine, real.recorded.sentences, progress, "real-model texts")
    assert built.sparse is not None
    check = real_reference.check(real.recorded.weights, real.fp32, built.sparse, thresholds)
    assert check.fp32 is not None and check.built is not None
    progress.log(
        "validate",
        f"real model's weights: fp32 reference off by at most {check.fp32.max_weight_error:.2e}; "
        f"built lexical score error {check.built.lexical_error:.5f}, top overlap "
        f"{check.built.top_overlap_mean:.4f} ({'ok' if check.passed else 'REFUSED'})",
    )
    return check
