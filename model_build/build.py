"""The build pipeline behind `python -m model_build` (and its Python API):

    fetch -> load -> reference -> [smoothquant] -> export -> attention -> quantize -> validate
        -> tokenizer -> manifest

Everything is written to a staging directory beside --out (same filesystem) and renamed into place
only after the fidelity gate passes; a failed or interrupted build leaves --out as it was.

    from model_build.build import BuildOptions, build
    report = build(BuildOptions(out=Path("artifacts/bge-m3-int8"), precision="int8"))
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from handler.engine.compact import RANGES_SECTION
from handler.engine.manifest import write_manifest
from model_build import (
    artifact,
    attention,
    precision,
    ranges,
    recipes,
    sentencepiece_export,
    source,
    validate,
)
from model_build.errors import BuildError, GateFailedError
from model_build.progress import Progress
from model_build.source import BGE_M3_REPO, Recipe
from model_build.tokenizer import PreparedTokenizer, prepare_tokenizer
from model_build.validate import Thresholds

Precision = Literal["int8", "fp16", "fp32"]
CALIBRATION_MAX_LENGTH = 512


@dataclass
class BuildOptions:
    out: Path
    source: str = BGE_M3_REPO
    revision: str | None = None  # None: pinned for BAAI/bge-m3, "main" for other repos
    recipe: Recipe = "bge-m3"
    precision: Precision = "int8"
    model_id: str | None = None
    aliases: list[str] | None = None
    max_length: int | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    validation_set: Path | None = None
    calibration_set: Path | None = None
    smoothquant_alpha: float | None = 0.5  # None: no SmoothQuant
    force: bool = False
    cache_dir: Path | None = None
    opset: int = recipes.DEFAULT_OPSET
    fault_inject: str | None = None
    int8_weights: str = "s8"  # "u8" for x86 without VNNI (see model_build/quantize.py)
    keep_staging: bool = False  # debugging: keep the staging dir of a failed build


@dataclass
class BuildReport:
    out: Path
    manifest: dict[str, Any]
    seconds: float

    @property
    def validation(self) -> dict[str, Any]:
        result: dict[str, Any] = self.manifest["validation"]
        return result


def default_model_id(options: BuildOptions) -> str:
    if options.model_id:
        return options.model_id
    if options.recipe == "bge-m3":
        return "bge-m3"
    name = options.source.rstrip("/\\").replace("\\", "/").split("/")[-1]
    return name.lower()


def default_aliases(options: BuildOptions, model_id: str, repo: str | None) -> list[str]:
    if options.aliases is not None:
        return [a for a in options.aliases if a != model_id]
    if repo is not None:
        return [repo] if repo != model_id else []
    if options.recipe == "bge-m3" and model_id == "bge-m3":
        return [BGE_M3_REPO]
    return []


def check_options(options: BuildOptions) -> None:
    if options.recipe not in ("bge-m3", "dense"):
        raise BuildError(f"unknown recipe {options.recipe!r}")
    if options.precision not in ("int8", "fp16", "fp32"):
        raise BuildError(f"unknown precision {options.precision!r}")
    out = options.out
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not options.force:
        raise BuildError(f"--out {out}: directory is not empty (pass --force to replace it)")
    if options.max_length is not None and options.max_length < 2:
        raise BuildError("--max-length must be at least 2")
    if options.fault_inject is not None:
        if options.fault_inject not in precision.FAULTS:
            raise BuildError(
                f"--fault-inject {options.fault_inject!r}: known faults {precision.FAULTS}"
            )
        if options.precision != "int8":
            raise BuildError("--fault-inject applies to --precision int8 only")
    if options.smoothquant_alpha is not None and not 0.0 <= options.smoothquant_alpha <= 1.0:
        raise BuildError("--smoothquant-alpha must be within [0, 1]")
    for name, value in vars(options.thresholds).items():
        if not 0.0 <= value <= 1.0:
            raise BuildError(f"--{name.replace('_', '-')} must be within [0, 1]")
    for path in (options.validation_set, options.calibration_set):
        if path is not None and not path.is_file():
            raise BuildError(f"{path}: text set not found")
    source.validate_source_arg(options.source)


def build(options: BuildOptions, progress: Progress | None = None) -> BuildReport:
    """Run the whole pipeline. Raises BuildError (usage/source) or GateFailedError."""
    progress = progress or Progress()
    started = time.time()
    check_options(options)
    out = options.out.expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    ok = False
    try:
        manifest = _build_in(staging, options, progress)
        with progress.stage("manifest", f"moving the artifact into {out}"):
            artifact.move_into_place(staging, out)
        ok = True
    finally:
        if not ok and staging.exists():
            if options.keep_staging:
                progress.log("manifest", f"kept the failed build's files in {staging}")
            else:
                shutil.rmtree(staging, ignore_errors=True)
    seconds = time.time() - started
    progress.log("done", f"{out} ({options.recipe}, {options.precision}) in {seconds:.1f}s")
    return BuildReport(out=out, manifest=manifest, seconds=seconds)


def _build_in(staging: Path, options: BuildOptions, progress: Progress) -> dict[str, Any]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    work = staging / ".work"
    work.mkdir()

    with progress.stage("fetch", f"source {options.source}"):
        src = source.resolve_source(
            options.source,
            options.recipe,
            revision=options.revision,
            cache_dir=options.cache_dir,
            progress=progress,
        )
        progress.log("fetch", f"using {src.path}")

    with progress.stage("load", f"{options.recipe} recipe from {src.path}"):
        tok = prepare_tokenizer(src.path)
        progress.log("load", f"tokenizer pre-tokenizer: {tok.pre_tokenizer}")
        model = recipes.load_model(src.path, options.recipe, progress)
        max_length = options.max_length or model.default_max_length
        if max_length > model.max_positions:
            raise BuildError(
                f"--max-length {max_length} exceeds the model's {model.max_positions} positions"
            )
        vocab = tok.tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > model.vocab_size:
            raise BuildError(
                f"tokenizer has {vocab} tokens but the model's embedding table only "
                f"{model.vocab_size}"
            )

    val_items = validate.load_text_set(options.validation_set or validate.VALIDATION_SET)
    with tok.truncating(max_length) as truncating:
        encoded = validate.encode_set(val_items, truncating)
    with progress.stage(
        "reference",
        f"fp32 PyTorch reference on {len(encoded.ids)} validation texts "
        f"({sum(encoded.lengths)} tokens, max_length {max_length})",
    ):
        reference = validate.run_batched(
            validate.torch_runner(model.module),
            encoded,
            model.output_names,
            tok.special_tokens["pad"],
            progress,
            "torch fp32",
            stage="reference",
        )

    smooth_report: dict[str, Any] | None = None
    if options.precision == "int8" and options.smoothquant_alpha is not None:
        with progress.stage("quantize", "SmoothQuant on the torch encoder (before export)"):
            smooth_report = _smoothquant(model, tok, options, max_length, progress)

    exported = work / "fp32" / "model.onnx"
    exported.parent.mkdir()
    with progress.stage("export", "torch.onnx.export (TorchScript exporter)"):
        recipes.export_onnx(
            model,
            exported,
            work_dir=work,
            opset=options.opset,
            special_tokens=tok.special_tokens,
            progress=progress,
        )
    with progress.stage("attention", "eager attention -> MultiHeadAttention"):
        fused = work / "fused" / "model.onnx"
        fused.parent.mkdir()
        attention_report = attention.fuse_attention(
            exported, fused, num_heads=model.num_heads, progress=progress
        )
        shutil.rmtree(exported.parent)
        exported = fused
    final = staging / artifact.ONNX_FILE
    with progress.stage("quantize", f"precision {options.precision}"):
        if options.precision == "fp32":
            precision.move_onnx(exported, final)
            quant: dict[str, Any] = {"method": "none", "note": "fp32 as exported"}
        elif options.precision == "fp16":
            quant = precision.to_fp16(exported, final, progress)
        else:
            quant = precision.to_int8(
                exported,
                final,
                fault_inject=options.fault_inject,
                weights=options.int8_weights,
                progress=progress,
            )
            if smooth_report is not None:
                quant = {**quant, "smoothquant": smooth_report}
            else:
                quant = {**quant, "smoothquant": {"applied": False}}
    shutil.rmtree(work)

    with progress.stage("validate", f"{options.precision} ONNX vs fp32 PyTorch reference"):
        validation = _validate(final, encoded, reference, model, tok, options, progress)

    with progress.stage("tokenizer", "tokenizer.json, and sentencepiece if it gives the same ids"):
        (staging / artifact.TOKENIZER_FILE).write_text(tok.to_json(), encoding="utf-8")
        probes = [item.text for item in val_items]
        probes += [item.text for item in validate.load_text_set(validate.CALIBRATION_SET)]
        spm_report = sentencepiece_export.export(tok, staging, probes)
        if spm_report["used"]:
            progress.log(
                "tokenizer",
                f"sentencepiece.model gives tokenizer.json's ids on all "
                f"{spm_report['probe_texts']} probe texts; the runtime will use it",
            )
        else:
            progress.log("tokenizer", f"tokenizer.json only: {spm_report['reason']}")

    with progress.stage("manifest", "manifest.json, permissions"):
        model_id = default_model_id(options)
        data = _manifest_data(
            staging,
            options,
            src,
            model,
            tok,
            max_length,
            model_id,
            quant,
            validation,
            attention_report,
            spm_report,
        )
        artifact.make_world_readable(staging)
        write_manifest(staging, data)
        artifact.make_world_readable(staging)

    with progress.stage("ranges", "int8/uint8 embedding ranges on the calibration set"):
        try:
            data[RANGES_SECTION] = ranges.add_ranges(staging, options.calibration_set)
        except Exception as exc:  # e.g. an fp16 graph the CPU provider cannot run
            # Without the section the artifact serves every type but int8 and uint8, and says so.
            progress.log("ranges", f"SKIPPED: {exc}")
    return data


def _smoothquant(
    model: recipes.LoadedModel,
    tok: PreparedTokenizer,
    options: BuildOptions,
    max_length: int,
    progress: Progress,
) -> dict[str, Any]:
    import torch

    path = options.calibration_set or validate.CALIBRATION_SET
    items = validate.load_text_set(path)
    with tok.truncating(min(max_length, CALIBRATION_MAX_LENGTH)) as truncating:
        calib = validate.encode_set(items, truncating)
    batches: list[dict[str, torch.Tensor]] = []
    for group in validate.length_batches(calib.lengths, max_tokens=4096, max_batch=16):
        ids, mask = validate.pad_batch([calib.ids[i] for i in group], tok.special_tokens["pad"])
        batches.append(
            {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        )
    progress.log(
        "quantize",
        f"calibration set {path.name}: {len(items)} texts, {sum(calib.lengths)} tokens",
    )
    assert options.smoothquant_alpha is not None
    report = precision.smoothquant(model.encoder, batches, options.smoothquant_alpha, progress)
    return {
        "applied": True,
        "alpha": options.smoothquant_alpha,
        "calibration_set": path.name,
        "calibration_texts": len(items),
        "calibration_tokens": sum(calib.lengths),
        **report,
    }


def _validate(
    final: Path,
    encoded: validate.EncodedSet,
    reference: list[validate.Outputs],
    model: recipes.LoadedModel,
    tok: PreparedTokenizer,
    options: BuildOptions,
    progress: Progress,
) -> dict[str, Any]:
    started = time.time()
    try:
        session = validate.make_session(final)
        candidate = validate.run_batched(
            validate.onnx_runner(session),
            encoded,
            model.output_names,
            tok.special_tokens["pad"],
            progress,
            f"onnxruntime {options.precision}",
        )
        del session
    except Exception as exc:  # onnxruntime raises its own (untyped) exception classes
        if options.precision != "fp16":
            raise
        # The GPU image's fp16 graph may need kernels the CPU provider lacks: build it anyway,
        # say so, and record why it was not validated (never invented figures).
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        reason = (
            f"onnxruntime {artifact.tool_versions()['onnxruntime']} on CPU cannot run this fp16 "
            f"graph ({first_line}); validate it on a GPU"
        )
        progress.log("validate", f"SKIPPED: {reason}")
        return {"skipped": reason}
    result = validate.compare(
        encoded,
        reference,
        candidate,
        recipe=options.recipe,
        specials=set(tok.special_tokens.values()),
        thresholds=options.thresholds,
    )
    result.extra = {
        "set": (options.validation_set or validate.VALIDATION_SET).name,
        "languages": sorted({i.lang for i in encoded.items}),
        "longest_text_tokens": max(encoded.lengths),
        "provider": "CPUExecutionProvider",
        "seconds": round(time.time() - started, 1),
    }
    progress.log("validate", validate.format_figures(result))
    for entry in result.worst:
        extra = ""
        if entry.get("colbert_cosine") is not None:
            extra = f", colbert {entry['colbert_cosine']:.5f}, top-5 {entry['sparse_top5_match']}"
        progress.log(
            "validate",
            f"  worst: dense {entry['dense_cosine']:.5f}{extra} [{entry['lang']}, "
            f"{entry['tokens']} tok] {entry['text']!r}",
        )
    data = result.to_manifest()
    if not result.passed:
        raise GateFailedError(
            f"fidelity gate failed for {options.precision}: {'; '.join(result.failures)}", data
        )
    progress.log("validate", "gate passed")
    return data


def _manifest_data(
    staging: Path,
    options: BuildOptions,
    src: source.SourceInfo,
    model: recipes.LoadedModel,
    tok: PreparedTokenizer,
    max_length: int,
    model_id: str,
    quant: dict[str, Any],
    validation: dict[str, Any],
    attention_report: dict[str, Any],
    spm_report: dict[str, Any],
) -> dict[str, Any]:
    onnx_path = staging / artifact.ONNX_FILE
    return {
        "model_id": model_id,
        "aliases": default_aliases(options, model_id, src.repo),
        "created": int(time.time()),
        "source": {
            "repo": src.repo,
            "revision": src.revision,
            "requested_revision": src.requested_revision,
            "local_dir": src.local_dir,
            "weights": src.weights_file,
            "files": {name: {"sha256": digest} for name, digest in src.files.items()},
            "sha256_verified": src.verified,
        },
        "recipe": options.recipe,
        "precision": options.precision,
        "dims": model.dims,
        "colbert_dims": model.colbert_dims,
        "max_length": max_length,
        "vocab_size": model.vocab_size,
        "pooling": model.pooling,
        "normalize": model.normalize,
        "special_tokens": tok.special_tokens,
        "tokenizer": {
            "file": artifact.TOKENIZER_FILE,
            "pre_tokenizer": tok.pre_tokenizer,
            "source_pre_tokenizer": tok.original_pre_tokenizer,
            "truncation": None,
            "padding": None,
            "sentencepiece": spm_report,
        },
        "onnx": {
            "file": artifact.ONNX_FILE,
            "external_data": recipes.EXTERNAL_DATA,
            "opset": artifact.onnx_opset(onnx_path),
            "inputs": recipes.INPUT_SPECS,
            "outputs": recipes.output_specs(model),
            "attention": attention_report,
        },
        "files": artifact.file_entries(staging),
        "quantization": quant,
        "validation": validation,
        "tools": artifact.tool_versions(),
    }
