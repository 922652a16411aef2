"""The build pipeline behind `python -m model_build` (and its Python API):

    fetch -> load -> reference -> [smoothquant] -> export -> attention -> quantize -> optimize
        -> tokenizer -> manifest (draft) -> validate -> manifest

Each stage fills its section of the typed manifest (handler/engine/manifest.py). Everything is
written to a staging directory beside --out (same filesystem); the gate loads that directory with
the runtime engine, exactly as the server will, and it is renamed into place only after the gate
passes: a failed or interrupted build leaves --out as it was.

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

from handler.engine.batching import pad, plan_batches
from handler.engine.manifest import (
    Manifest,
    OnnxSection,
    QuantizationSection,
    SourceSection,
    Thresholds,
    TokenizerSection,
    ValidationSection,
    write_manifest,
)
from model_build import (
    artifact,
    attention,
    faults,
    gate,
    optimize,
    precision,
    ranges,
    recipes,
    sentencepiece_export,
    source,
    validate,
)
from model_build.errors import BuildError
from model_build.progress import Progress
from model_build.source import BGE_M3_REPO, Recipe
from model_build.tokenizer import PreparedTokenizer, prepare_tokenizer

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
    # Ship onnxruntime's optimization of the graph (CPU precisions): a faster start (optimize.py).
    optimize_graph: bool = True


@dataclass
class BuildReport:
    out: Path
    manifest: Manifest
    seconds: float

    @property
    def validation(self) -> ValidationSection:
        assert self.manifest.validation is not None
        return self.manifest.validation


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
        if options.fault_inject == "int8-weight-scale" and options.precision != "int8":
            raise BuildError("--fault-inject int8-weight-scale applies to --precision int8 only")
        if options.fault_inject == "sparse-head" and options.recipe != "bge-m3":
            raise BuildError("--fault-inject sparse-head applies to --recipe bge-m3 only")
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


def runs_on_cpu_provider(precision: Precision) -> bool:
    """fp16 is the GPU variant (its graph is optimized by the CUDA provider where it runs)."""
    return precision != "fp16"


def _build_in(staging: Path, options: BuildOptions, progress: Progress) -> Manifest:
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
        source_section = _source_section(src)

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
    # A model with a sparse head is also scored on query-passage pairs: one query per text.
    has_sparse = "sparse" in model.output_names
    probe_items = validate.with_queries(val_items) if has_sparse else val_items
    with tok.truncating(max_length) as truncating:
        probe = validate.encode_set(probe_items, truncating)
    with progress.stage(
        "reference",
        f"fp32 PyTorch reference on {len(val_items)} validation texts"
        f"{f' and {len(val_items)} queries' if has_sparse else ''} "
        f"({sum(probe.lengths)} tokens, max_length {max_length})",
    ):
        reference = validate.run_reference(
            model.module, probe.ids, model.output_names, tok.special_tokens, progress
        )
        real = gate.real_model_reference(source_section, model, tok, max_length, progress)

    if options.fault_inject == "sparse-head":
        progress.log("reference", "FAULT INJECTED: noise on the sparse head after the reference")
        faults.damage_sparse_head(model)

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
        quantization = _quantize(exported, final, options, smooth_report, progress)
    shutil.rmtree(work)
    optimized = None
    if options.optimize_graph and runs_on_cpu_provider(options.precision):
        with progress.stage("optimize", "onnxruntime's extended graph optimization, saved"):
            optimized = optimize.optimize_graph(final, recipes.EXTERNAL_DATA, progress)
    onnx_section = OnnxSection(
        file=artifact.ONNX_FILE,
        inputs=recipes.INPUT_SPECS,
        outputs=recipes.output_specs(model),
        external_data=recipes.EXTERNAL_DATA,
        opset=artifact.onnx_opset(final),
        attention=attention_report,
        optimized=optimized,
    )

    with progress.stage("tokenizer", "tokenizer.json, and sentencepiece if it gives the same ids"):
        tokenizer_section = _write_tokenizer(staging, tok, val_items, progress)

    with progress.stage("manifest", "manifest.json (before the gate: the engine loads it)"):
        model_id = default_model_id(options)
        manifest = Manifest(
            model_id=model_id,
            recipe=options.recipe,
            precision=options.precision,
            dims=model.dims,
            max_length=max_length,
            vocab_size=model.vocab_size,
            pooling=model.pooling,
            normalize=model.normalize,
            special_tokens=tok.special_tokens,
            tokenizer=tokenizer_section,
            onnx=onnx_section,
            files=artifact.file_entries(staging),
            aliases=tuple(default_aliases(options, model_id, src.repo)),
            created=int(time.time()),
            colbert_dims=model.colbert_dims,
            source=source_section,
            quantization=quantization,
            tools=artifact.tool_versions(),
        )
        write_manifest(staging, manifest)

    with progress.stage("validate", f"{options.precision} as served vs fp32 PyTorch reference"):
        validation = gate.run(
            staging,
            probe,
            len(val_items),
            reference,
            real,
            precision=options.precision,
            thresholds=options.thresholds,
            set_name=(options.validation_set or validate.VALIDATION_SET).name,
            progress=progress,
        )

    embedding_ranges = None
    with progress.stage("ranges", "int8/uint8 embedding ranges on the calibration set"):
        try:
            embedding_ranges = ranges.measure_ranges(staging, options.calibration_set)
        except Exception as exc:  # e.g. an fp16 graph the CPU provider cannot run
            # Without the section the artifact serves every type but int8 and uint8, and says so.
            progress.log("ranges", f"SKIPPED: {exc}")

    with progress.stage("manifest", "manifest.json with the gate's figures, permissions"):
        manifest = manifest.with_sections(validation=validation, embedding_ranges=embedding_ranges)
        write_manifest(staging, manifest)
        artifact.make_world_readable(staging)
    return manifest


def _source_section(src: source.SourceInfo) -> SourceSection:
    return SourceSection(
        repo=src.repo,
        revision=src.revision,
        requested_revision=src.requested_revision,
        local_dir=src.local_dir,
        weights=src.weights_file,
        files=dict(src.files),
        sha256_verified=tuple(src.verified),
    )


def _quantize(
    exported: Path,
    final: Path,
    options: BuildOptions,
    smooth_report: dict[str, Any] | None,
    progress: Progress,
) -> QuantizationSection:
    if options.precision == "fp32":
        precision.move_onnx(exported, final)
        return QuantizationSection(method="none", report={"note": "fp32 as exported"})
    if options.precision == "fp16":
        report = precision.to_fp16(exported, final, progress)
        return QuantizationSection(method=str(report["method"]), report=report)
    report = precision.to_int8(
        exported,
        final,
        fault_inject=options.fault_inject
        if options.fault_inject in precision.INT8_FAULTS
        else None,
        weights=options.int8_weights,
        progress=progress,
    )
    report["smoothquant"] = smooth_report if smooth_report is not None else {"applied": False}
    return QuantizationSection(
        method=str(report["method"]),
        int8_weights="u8" if options.int8_weights == "u8" else "s8",
        report=report,
    )


def _write_tokenizer(
    staging: Path, tok: PreparedTokenizer, val_items: list[validate.TextItem], progress: Progress
) -> TokenizerSection:
    (staging / artifact.TOKENIZER_FILE).write_text(tok.to_json(), encoding="utf-8")
    probes = [item.text for item in val_items]
    probes += [item.text for item in validate.load_text_set(validate.CALIBRATION_SET)]
    spm = sentencepiece_export.export(tok, staging, probes)
    if spm.used:
        progress.log(
            "tokenizer",
            f"sentencepiece.model gives tokenizer.json's ids on all {spm.probe_texts} probe "
            "texts; the runtime will use it",
        )
    else:
        progress.log("tokenizer", f"tokenizer.json only: {spm.reason}")
    return TokenizerSection(
        file=artifact.TOKENIZER_FILE,
        pre_tokenizer=tok.pre_tokenizer,
        source_pre_tokenizer=tok.original_pre_tokenizer,
        sentencepiece=spm,
    )


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
    for group in plan_batches(calib.lengths, token_budget=4096, max_batch=16):
        ids, mask = pad([calib.ids[i] for i in group], tok.special_tokens["pad"])
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
