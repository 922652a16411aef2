"""The build manifest: what `python -m model_build --out DIR` writes beside the model.

The runtime reads it and never downloads anything; the build (`model_build/`) imports this module to
write it, so the schema lives in one place: the dataclasses below, section by section. The build
fills each section in the stage that knows it (source, tokenizer, graph, quantization, the gate) and
the engine reads the same types back; nothing outside this module touches the JSON document itself.
Everything the engine needs to run a model (file names, graph inputs and outputs, dims, max length,
special ids) comes from here, not from guesses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from handler.engine.errors import ModelLoadError

MANIFEST_NAME = "manifest.json"
# 2: typed sections, the sparse gate's tie-stable figures and the digests of the gated files.
FORMAT_VERSION = 2
REBUILD_COMMAND = "python -m model_build --out DIR"

Recipe = Literal["bge-m3", "dense"]
Precision = Literal["int8", "fp16", "fp32"]
VerifyMode = Literal["sha256", "size", "off"]
Int8Weights = Literal["s8", "u8"]
OptimizationLevel = Literal["basic", "extended"]

RECIPES: tuple[Recipe, ...] = ("bge-m3", "dense")
PRECISIONS: tuple[Precision, ...] = ("int8", "fp16", "fp32")
VERIFY_MODES: tuple[VerifyMode, ...] = ("sha256", "size", "off")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    # Symbolic axes are strings ("batch", "sequence"), fixed ones ints.
    shape: tuple[str | int, ...]


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class SentencePieceFiles:
    """The tokenizer's Unigram vocabulary as a sentencepiece model, with the tokenizer.json parts
    around it (normalizer, pre-tokenizer, special tokens, decoder). See engine/tokenizer.py."""

    model_file: str
    frontend_file: str


# ---- sections -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSection:
    """Where the weights came from (stage fetch)."""

    repo: str | None = None  # hub repo id; None for a local directory
    revision: str | None = None  # the commit the files came from
    requested_revision: str | None = None
    local_dir: str | None = None
    weights: str | None = None  # the weights file used
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256 of every file used
    sha256_verified: tuple[str, ...] = ()  # names checked against the pinned digests

    @property
    def label(self) -> str:
        return self.repo or self.local_dir or ""


@dataclass(frozen=True)
class SentencePieceSection:
    """Whether the runtime may tokenize with sentencepiece, and the proof or the reason not."""

    used: bool
    model: str | None = None
    frontend: str | None = None
    probe_texts: int = 0  # texts on which it gave tokenizer.json's ids
    probe_tokens: int = 0
    reason: str | None = None  # why not, when unused


@dataclass(frozen=True)
class TokenizerSection:
    file: str
    pre_tokenizer: str | None = None
    source_pre_tokenizer: str | None = None
    sentencepiece: SentencePieceSection | None = None


@dataclass(frozen=True)
class OptimizedGraph:
    """The graph file is onnxruntime's own optimization of the exported graph, saved at build time
    (stage optimize): the engine may load it with its graph optimizations off when it runs the
    same onnxruntime on the same provider with the same fusions disabled."""

    level: OptimizationLevel  # below the layout level, which depends on the CPU
    onnxruntime: str  # the version that optimized it
    provider: str
    disabled_optimizers: tuple[str, ...] = ()


@dataclass(frozen=True)
class OnnxSection:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: str | None = None
    opset: int | None = None
    attention: dict[str, Any] = field(default_factory=dict)  # the attention rewrite's report
    optimized: OptimizedGraph | None = None  # None: as exported, the engine optimizes at load


@dataclass(frozen=True)
class QuantizationSection:
    method: str  # "none", "fp16", or the int8 scheme
    # The int8 kernel family the weights were stored for; the engine warns where it is inexact.
    int8_weights: Int8Weights | None = None
    # The stage's full report for humans: what stayed fp32 and why, errors, sizes, SmoothQuant.
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Thresholds:
    """The fidelity gate's limits. A model below a minimum or above a maximum fails the build."""

    min_dense_cosine: float = 0.99
    min_dense_mean: float = 0.997
    # sum |score error| / sum |reference score| of the lexical match scores of query-passage pairs
    max_lexical_error: float = 0.05
    # mean weighted overlap of each text's heaviest tokens (near-ties swap places at no cost)
    min_sparse_overlap: float = 0.9
    min_colbert_mean: float = 0.99


@dataclass(frozen=True)
class DenseFigures:
    cosine_min: float
    cosine_mean: float


@dataclass(frozen=True)
class SparseFigures:
    """Lexical weights of the candidate against those of the reference."""

    # Lexical match scores over every query-passage pair: sum |s - s_ref| / sum |s_ref|.
    lexical_error: float
    lexical_error_worst_query: float  # the same ratio within the worst query's row of pairs
    pairs: int
    # Per text, over the union of both sides' heaviest tokens: sum min(w, w_ref) / sum max(...).
    top_overlap_mean: float
    top_overlap_min: float
    top_k: int
    # Informative only: identical top-5 id sets (near-tied weights make it flip) and cosine.
    top5_identical: float
    cosine_mean: float


@dataclass(frozen=True)
class ColbertFigures:
    cosine_mean: float  # over each text's rows, then over texts
    cosine_min: float


@dataclass(frozen=True)
class GateFigures:
    dense: DenseFigures
    sparse: SparseFigures | None = None
    colbert: ColbertFigures | None = None


@dataclass(frozen=True)
class TextScore:
    """One validation text's agreement with the reference (the worst ones are recorded)."""

    index: int
    lang: str
    tokens: int
    dense_cosine: float
    sparse_top_overlap: float | None = None
    colbert_cosine: float | None = None
    text: str = ""


@dataclass(frozen=True)
class LexicalAgreement:
    """Lexical weights against a recorded reference (the real model's own outputs)."""

    max_weight_error: float  # over every token of every text, absent tokens counting as 0
    lexical_error: float  # every text both query and passage
    top_overlap_mean: float
    top_overlap_min: float


@dataclass(frozen=True)
class RealModelCheck:
    """The fp32 reference and the built model against the lexical weights that the real
    BAAI/bge-m3 gave (model_build/reference/bge-m3/embeddings_ref.json)."""

    skipped: str | None = None  # why it did not apply (any other source)
    passed: bool = True
    texts: int = 0
    max_weight_error_fp32: float | None = None  # the limit on `fp32.max_weight_error`
    fp32: LexicalAgreement | None = None
    built: LexicalAgreement | None = None
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class GateSession:
    """How the gate ran the model: through the runtime engine, as the server does."""

    loader: str
    provider: str
    threads: int
    batch_token_budget: int
    attention_square_budget: int
    max_batch_size: int


@dataclass(frozen=True)
class ValidationSection:
    """The fidelity gate (stage validate)."""

    passed: bool
    skipped: str | None = None  # why there are no figures (fp16 without CPU kernels)
    figures: GateFigures | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    failures: tuple[str, ...] = ()
    worst_texts: tuple[TextScore, ...] = ()
    texts: int = 0
    queries: int = 0  # short queries cut from the texts, for the lexical pairs
    tokens: int = 0
    truncated_texts: int = 0
    set: str = ""
    languages: tuple[str, ...] = ()
    longest_text_tokens: int = 0
    # sha256 of every file the gate's engine loaded (it verified them): the served bytes.
    gated_files: dict[str, str] = field(default_factory=dict)
    session: GateSession | None = None
    real_model: RealModelCheck | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class EmbeddingRanges:
    """Per-dimension [min, max] of the dense vectors on the calibration texts, measured by the
    finished artifact at build time: every request and every container quantizes int8 and uint8
    embeddings with these (handler/engine/compact.py)."""

    min: tuple[float, ...]
    max: tuple[float, ...]
    set: str = ""
    texts: int = 0


@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed. Sections other tools or humans read (source, quantization, the gate's
    figures, tool versions) are typed too; `notes` holds what other tools (the benchmarks) record
    about an artifact, and the engine never reads it."""

    model_id: str
    recipe: Recipe
    precision: Precision
    dims: int
    max_length: int
    vocab_size: int
    pooling: str
    normalize: bool
    special_tokens: dict[str, int]
    tokenizer: TokenizerSection
    onnx: OnnxSection
    files: dict[str, FileEntry]
    format_version: int = FORMAT_VERSION
    aliases: tuple[str, ...] = ()
    created: int = 0  # unix time of the build
    colbert_dims: int | None = None
    source: SourceSection = field(default_factory=SourceSection)
    quantization: QuantizationSection | None = None
    validation: ValidationSection | None = None
    embedding_ranges: EmbeddingRanges | None = None
    tools: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def onnx_file(self) -> str:
        return self.onnx.file

    @property
    def tokenizer_file(self) -> str:
        return self.tokenizer.file

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.onnx.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.onnx.outputs

    @property
    def sentencepiece(self) -> SentencePieceFiles | None:
        """Set when the build proved sentencepiece gives tokenizer.json's ids; else None."""
        spm = self.tokenizer.sentencepiece
        if spm is None or not spm.used or not spm.model or not spm.frontend:
            return None
        return SentencePieceFiles(model_file=spm.model, frontend_file=spm.frontend)

    @property
    def int8_weights(self) -> Int8Weights | None:
        return self.quantization.int8_weights if self.quantization else None

    # Cached: a manifest never changes once read, and the engine asks on every request.
    @cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @cached_property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def fingerprint(self) -> str:
        """One short id for the whole artifact: the sha256 of the model graph file."""
        return self.files[self.onnx_file].sha256

    def with_sections(self, **sections: Any) -> Manifest:
        """A copy with some sections replaced (the build fills the manifest stage by stage)."""
        return replace(self, **sections)


@cache
def _adapter() -> TypeAdapter[Manifest]:
    return TypeAdapter(Manifest)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), size=path.stat().st_size)


def _problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "(document)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{location}: {first['msg']}{more}"


def parse_manifest(data: Mapping[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    """Validate a manifest document; every problem is a ModelLoadError that says what is wrong."""
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{where}: format_version {version} is not supported (this runtime reads "
            f"{FORMAT_VERSION}); rebuild the model with this version: `{REBUILD_COMMAND}` "
            "(with the options it was built with)"
        )
    try:
        manifest = _adapter().validate_python(dict(data))
    except ValidationError as exc:
        raise ModelLoadError(f"{where}: malformed: {_problem(exc)}") from exc
    needed_files = [manifest.onnx_file, manifest.tokenizer_file]
    spm = manifest.sentencepiece
    if spm is not None:
        needed_files += [spm.model_file, spm.frontend_file]
    for needed in needed_files:
        if needed not in manifest.files:
            raise ModelLoadError(f"{where}: '{needed}' is used but not listed under 'files'")
    if not manifest.inputs or not manifest.outputs:
        raise ModelLoadError(f"{where}: 'onnx.inputs' and 'onnx.outputs' must not be empty")
    return manifest


def manifest_document(manifest: Manifest) -> dict[str, Any]:
    """The JSON document of a manifest (what write_manifest writes)."""
    document: dict[str, Any] = _adapter().dump_python(manifest, mode="json")
    return document


def load_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: not found; MODEL_PATH must name a directory made by `{REBUILD_COMMAND}`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object")
    return parse_manifest(data, where=str(path))


def verify_files(model_dir: Path, manifest: Manifest, mode: VerifyMode = "sha256") -> None:
    """Check every listed file exists with the recorded size (and digest, in sha256 mode).

    The error names the file, so a damaged image or a half-copied directory is obvious at start.
    """
    if mode == "off":
        return
    for name, entry in manifest.files.items():
        path = model_dir / name
        if not path.is_file():
            raise ModelLoadError(f"{path}: listed in {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != entry.size:
            raise ModelLoadError(
                f"{path}: size {size} does not match {MANIFEST_NAME} ({entry.size}); "
                "the model directory is damaged or was changed after the build"
            )
        if mode == "sha256" and sha256_file(path) != entry.sha256:
            raise ModelLoadError(
                f"{path}: sha256 does not match {MANIFEST_NAME}; "
                "the model directory is damaged or was changed after the build"
            )


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Write a manifest (re-validated through the reader, so the build cannot write what the
    runtime refuses). Used by model_build."""
    document = manifest_document(manifest)
    parse_manifest(document)
    path = model_dir / MANIFEST_NAME
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
