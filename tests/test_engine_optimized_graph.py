"""The graph optimized at build time (model_build/optimize.py): the engine loads it with
onnxruntime's optimizations off where the manifest says it was made for this onnxruntime and
provider, and optimizes it again everywhere else; the vectors are the same either way."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from handler.engine import Engine, EngineConfig
from handler.engine.manifest import OptimizedGraph, load_manifest
from handler.engine.session import cpu_disabled_optimizers, optimization_level

TEXTS = [
    "What is BGE M3?",
    "BGE-M3 是一個支援稠密檢索、詞彙匹配與多向量互動的嵌入模型。",
    "Русский текст для проверки токенизатора.",
    " ".join(f"sentence {i} talks about retrieval and vector databases." for i in range(12)),
]
OFF = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def _level(engine: Engine) -> ort.GraphOptimizationLevel:
    level: ort.GraphOptimizationLevel = (
        engine.session.get_session_options().graph_optimization_level
    )
    return level


def _copy_with_manifest(artifact: Path, tmp_path: Path, edit_onnx: dict[str, object]) -> Path:
    """The artifact's files unchanged, its manifest's `onnx` section edited."""
    copy = tmp_path / artifact.name
    shutil.copytree(artifact, copy)
    document = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    document["onnx"].update(edit_onnx)
    document["onnx"] = {k: v for k, v in document["onnx"].items() if v is not None}
    (copy / "manifest.json").write_text(json.dumps(document), encoding="utf-8")
    return copy


def _same_vectors(a: Engine, b: Engine) -> None:
    x = a.encode(TEXTS, dense=True, sparse=True, colbert=True)
    y = b.encode(TEXTS, dense=True, sparse=True, colbert=True)
    assert x.dense is not None and y.dense is not None
    np.testing.assert_allclose(x.dense, y.dense, rtol=0, atol=1e-6)
    assert x.sparse is not None and y.sparse is not None
    for ours, theirs in zip(x.sparse, y.sparse, strict=True):
        assert ours.keys() == theirs.keys()
        np.testing.assert_allclose(list(ours.values()), list(theirs.values()), rtol=0, atol=1e-6)
    assert x.colbert is not None and y.colbert is not None
    for ours_rows, theirs_rows in zip(x.colbert, y.colbert, strict=True):
        np.testing.assert_allclose(ours_rows, theirs_rows, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def optimized_off(tiny_int8: Path) -> Engine:
    return Engine.load(tiny_int8, EngineConfig(threads=1))


def test_the_built_graph_loads_with_optimizations_off(optimized_off: Engine) -> None:
    assert optimized_off.manifest.onnx.optimized is not None
    assert _level(optimized_off) == OFF


def test_another_onnxruntime_optimizes_again_and_gets_the_same_vectors(
    tiny_int8: Path, tmp_path: Path, optimized_off: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN the same artifact whose manifest says another onnxruntime optimized its graph
    record = json.loads((tiny_int8 / "manifest.json").read_text())["onnx"]["optimized"]
    other = _copy_with_manifest(tiny_int8, tmp_path, {"optimized": {**record, "onnxruntime": "0"}})
    # WHEN the engine loads it
    with caplog.at_level(logging.INFO, logger="handler.engine.session"):
        engine = Engine.load(other, EngineConfig(threads=1))
    # THEN it optimizes at load as for any graph, says why, and the vectors do not change
    assert _level(engine) == ALL
    assert f"optimized by onnxruntime 0, this is {ort.__version__}" in caplog.text
    _same_vectors(optimized_off, engine)


def test_a_manifest_without_the_section_still_loads_and_optimizes(
    tiny_int8: Path, tmp_path: Path, optimized_off: Engine
) -> None:
    # GIVEN a manifest written before the optimize stage existed (no `onnx.optimized`)
    old = _copy_with_manifest(tiny_int8, tmp_path, {"optimized": None})
    assert "optimized" not in json.loads((old / "manifest.json").read_text())["onnx"]
    assert load_manifest(old).onnx.optimized is None
    engine = Engine.load(old, EngineConfig(threads=1))
    assert _level(engine) == ALL
    _same_vectors(optimized_off, engine)


def test_only_the_provider_version_and_fusions_that_made_the_graph_skip_optimizing() -> None:
    made_here = OptimizedGraph(
        level="extended",
        onnxruntime=ort.__version__,
        provider="CPUExecutionProvider",
        disabled_optimizers=tuple(cpu_disabled_optimizers()),
    )
    assert optimization_level(made_here, "CPUExecutionProvider") == (OFF, None)
    assert optimization_level(None, "CPUExecutionProvider") == (ALL, None)
    level, why = optimization_level(made_here, "CUDAExecutionProvider")
    assert level == ALL and why is not None and "CUDAExecutionProvider" in why
    other_fusions = OptimizedGraph("extended", ort.__version__, "CPUExecutionProvider", ())
    level, why = optimization_level(other_fusions, "CPUExecutionProvider")
    assert level == ALL and why is not None and "SkipLayerNormFusion" in why
