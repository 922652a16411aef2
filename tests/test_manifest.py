"""The manifest schema (handler/engine/manifest.py): typed sections written and read back through
the same dataclasses, and documents the runtime refuses with a message that says what to do."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from handler.engine.errors import ModelLoadError
from handler.engine.manifest import (
    FORMAT_VERSION,
    FileEntry,
    Manifest,
    OnnxSection,
    OptimizedGraph,
    QuantizationSection,
    SentencePieceSection,
    SourceSection,
    TensorSpec,
    TokenizerSection,
    load_manifest,
    manifest_document,
    parse_manifest,
    write_manifest,
)


def _manifest(**sections: Any) -> Manifest:
    base = Manifest(
        model_id="m",
        recipe="bge-m3",
        precision="int8",
        dims=4,
        max_length=16,
        vocab_size=10,
        pooling="cls",
        normalize=True,
        special_tokens={"cls": 0, "pad": 1, "sep": 2, "unk": 3},
        tokenizer=TokenizerSection(
            file="tokenizer.json",
            sentencepiece=SentencePieceSection(
                used=True, model="sentencepiece.model", frontend="tokenizer.frontend.json"
            ),
        ),
        onnx=OnnxSection(
            file="model.onnx",
            inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
            outputs=(TensorSpec("dense", "float32", ("batch", 4)),),
        ),
        files={
            name: FileEntry(sha256="0" * 64, size=1)
            for name in (
                "model.onnx",
                "tokenizer.json",
                "sentencepiece.model",
                "tokenizer.frontend.json",
            )
        },
        source=SourceSection(repo="BAAI/bge-m3", revision="abc"),
        quantization=QuantizationSection(method="int8", int8_weights="u8", report={"x": [1]}),
    )
    return base.with_sections(**sections)


def test_a_written_manifest_reads_back_equal(tmp_path: Path) -> None:
    manifest = _manifest(aliases=("BAAI/bge-m3",), created=123)
    write_manifest(tmp_path, manifest)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.format_version == FORMAT_VERSION
    assert loaded.int8_weights == "u8" and loaded.source.label == "BAAI/bge-m3"
    assert loaded.sentencepiece is not None
    assert loaded.sentencepiece.model_file == "sentencepiece.model"


def test_the_optimized_graph_record_reads_back_and_is_optional(tmp_path: Path) -> None:
    base = _manifest()
    record = OptimizedGraph(
        level="extended",
        onnxruntime="1.31.1",
        provider="CPUExecutionProvider",
        disabled_optimizers=("SkipLayerNormFusion",),
    )
    manifest = base.with_sections(onnx=replace(base.onnx, optimized=record))
    write_manifest(tmp_path, manifest)
    assert load_manifest(tmp_path).onnx.optimized == record
    # A manifest from before the section existed reads as a graph nobody optimized.
    document = manifest_document(base)
    del document["onnx"]["optimized"]
    assert parse_manifest(document).onnx.optimized is None
    document["onnx"]["optimized"] = {**manifest_document(manifest)["onnx"]["optimized"]}
    document["onnx"]["optimized"]["level"] = "all"  # the layout level depends on the CPU
    with pytest.raises(ModelLoadError, match=r"onnx\.optimized\.level"):
        parse_manifest(document)


def test_a_manifest_of_the_previous_format_names_the_rebuild_command(tmp_path: Path) -> None:
    # GIVEN a manifest an older model_build wrote (format 1: untyped sections)
    document = manifest_document(_manifest())
    document["format_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(document))
    # THEN the runtime refuses it and says how to rebuild
    with pytest.raises(ModelLoadError) as refused:
        load_manifest(tmp_path)
    message = str(refused.value)
    assert "format_version 1 is not supported" in message
    assert "python -m model_build --out DIR" in message


def test_a_malformed_section_is_named() -> None:
    document = manifest_document(_manifest())
    document["onnx"]["outputs"][0]["shape"] = "batch"
    with pytest.raises(ModelLoadError, match=r"onnx\.outputs\.0\.shape"):
        parse_manifest(document)
    del document["onnx"]
    with pytest.raises(ModelLoadError, match=r"onnx: Field required"):
        parse_manifest(document)
    document = manifest_document(_manifest())
    document["precision"] = "int4"
    with pytest.raises(ModelLoadError, match="precision"):
        parse_manifest(document)


def test_a_used_file_must_be_listed() -> None:
    document = manifest_document(_manifest())
    del document["files"]["sentencepiece.model"]
    with pytest.raises(ModelLoadError, match=r"'sentencepiece\.model' is used but not listed"):
        parse_manifest(document)
