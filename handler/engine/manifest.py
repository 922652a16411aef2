"""The build manifest: what `python -m model_build --out DIR` writes beside the model.

The runtime reads it and never downloads anything; the build (`model_build/`) imports this module to
write it, so the schema lives in one place. Everything the engine needs to run a model (file names,
graph inputs and outputs, dims, max length, special ids) comes from here, not from guesses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from handler.engine.errors import ModelLoadError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

Recipe = Literal["bge-m3", "dense"]
Precision = Literal["int8", "fp16", "fp32"]
VerifyMode = Literal["sha256", "size", "off"]

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


@dataclass(frozen=True)
class Manifest:
    """The typed part of manifest.json. `raw` keeps the whole document (source, quantization,
    validation figures, tool versions) for /health, /models and humans."""

    model_id: str
    recipe: Recipe
    precision: Precision
    dims: int
    max_length: int
    vocab_size: int
    pooling: str
    normalize: bool
    special_tokens: dict[str, int]
    onnx_file: str
    tokenizer_file: str
    # Set when the build proved sentencepiece gives tokenizer.json's ids; else None.
    sentencepiece: SentencePieceFiles | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, FileEntry]
    raw: dict[str, Any]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def fingerprint(self) -> str:
        """One short id for the whole artifact: the sha256 of the model graph file."""
        return self.files[self.onnx_file].sha256


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), size=path.stat().st_size)


def _tensor_specs(items: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list) or not items:
        raise ModelLoadError(f"{MANIFEST_NAME}: '{where}' must be a non-empty list")
    return tuple(
        TensorSpec(name=str(t["name"]), dtype=str(t["dtype"]), shape=tuple(t["shape"]))
        for t in items
    )


def _sentencepiece(section: Any) -> SentencePieceFiles | None:
    if not isinstance(section, dict) or not section.get("used"):
        return None
    return SentencePieceFiles(
        model_file=str(section["model"]), frontend_file=str(section["frontend"])
    )


def parse_manifest(data: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    """Validate a manifest document; every problem is a ModelLoadError that says what is wrong."""
    try:
        version = data["format_version"]
        if version != FORMAT_VERSION:
            raise ModelLoadError(
                f"{where}: format_version {version} is not supported (expected {FORMAT_VERSION}); "
                "rebuild the model with this version of model_build"
            )
        recipe = data["recipe"]
        precision = data["precision"]
        if recipe not in RECIPES:
            raise ModelLoadError(f"{where}: unknown recipe {recipe!r}")
        if precision not in PRECISIONS:
            raise ModelLoadError(f"{where}: unknown precision {precision!r}")
        files = {
            str(name): FileEntry(sha256=str(entry["sha256"]), size=int(entry["size"]))
            for name, entry in data["files"].items()
        }
        manifest = Manifest(
            model_id=str(data["model_id"]),
            recipe=recipe,
            precision=precision,
            dims=int(data["dims"]),
            max_length=int(data["max_length"]),
            vocab_size=int(data["vocab_size"]),
            pooling=str(data["pooling"]),
            normalize=bool(data["normalize"]),
            special_tokens={str(k): int(v) for k, v in data["special_tokens"].items()},
            onnx_file=str(data["onnx"]["file"]),
            tokenizer_file=str(data["tokenizer"]["file"]),
            sentencepiece=_sentencepiece(data["tokenizer"].get("sentencepiece")),
            inputs=_tensor_specs(data["onnx"]["inputs"], "onnx.inputs"),
            outputs=_tensor_specs(data["onnx"]["outputs"], "onnx.outputs"),
            files=files,
            raw=data,
        )
    except KeyError as exc:
        raise ModelLoadError(f"{where}: missing key {exc.args[0]!r}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{where}: malformed ({exc})") from exc
    needed_files = [manifest.onnx_file, manifest.tokenizer_file]
    if manifest.sentencepiece is not None:
        needed_files += [manifest.sentencepiece.model_file, manifest.sentencepiece.frontend_file]
    for needed in needed_files:
        if needed not in files:
            raise ModelLoadError(f"{where}: '{needed}' is used but not listed under 'files'")
    return manifest


def load_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: not found; MODEL_PATH must name a directory made by "
            "`python -m model_build --out DIR`"
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


def write_manifest(model_dir: Path, data: dict[str, Any]) -> Path:
    """Write (and re-validate) a manifest document. Used by model_build."""
    data = {"format_version": FORMAT_VERSION, **data}
    parse_manifest(data)
    path = model_dir / MANIFEST_NAME
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
