"""Compact embedding types (Cohere's names float, int8, uint8, binary, ubinary): the packing
against sentence-transformers' own `quantize_embeddings`, the native route and the OpenAI
extension (through the openai client), and the ranges the build calibrates into the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from fakes import FakeEngine, LiveServer, bge_m3_like, make_app
from fastapi.testclient import TestClient
from sentence_transformers.util.quantization import quantize_embeddings

from handler.engine.compact import EMBEDDING_TYPES, Ranges, compact

RANGES_SECTION = "embedding_ranges"  # the manifest key (handler.engine.manifest.Manifest)

TYPES = ["float", "int8", "uint8", "binary", "ubinary"]


def unit_rows(n: int, dims: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dims)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dims", [8, 24, 1024])
def test_packing_equals_sentence_transformers(dims: int) -> None:
    calibration = unit_rows(200, dims, 1)
    ranges = Ranges(calibration.min(axis=0), calibration.max(axis=0))
    vectors = unit_rows(30, dims, 2)
    vectors[0, :] = 0.0  # zero is not > 0: a 0 bit
    got = compact(vectors, TYPES, ranges)
    assert list(got) == TYPES
    for kind in ("int8", "uint8", "binary", "ubinary"):
        want = quantize_embeddings(
            vectors, precision=kind, ranges=np.stack([ranges.low, ranges.high])
        )
        assert got[kind].dtype == want.dtype, kind
        np.testing.assert_array_equal(got[kind], want, err_msg=kind)
    assert got["binary"].shape == (30, dims // 8)
    np.testing.assert_array_equal(got["float"], vectors)


class NoRanges(FakeEngine):
    @property
    def embedding_ranges(self) -> Ranges | None:
        return None


def test_native_embedding_types() -> None:
    fake = bge_m3_like()
    client = TestClient(make_app(fake))
    texts = ["a b c", "d e"]
    r = client.post(
        "/embeddings",
        json={"input": texts, "embedding_types": ["int8", "ubinary", "float"]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert "dense_vecs" not in body and list(body["embeddings"]) == ["int8", "ubinary", "float"]
    dense = np.stack([fake.expected_dense(t) for t in texts])
    want = compact(dense, ["int8", "ubinary"], fake.embedding_ranges)
    assert body["embeddings"]["int8"] == want["int8"].tolist()
    assert body["embeddings"]["ubinary"] == want["ubinary"].tolist()
    assert len(body["embeddings"]["ubinary"][0]) == fake.dims // 8
    np.testing.assert_array_equal(np.array(body["embeddings"]["float"], np.float32), dense)
    assert "sparse_vecs" in body  # the other outputs as before
    # without the option: the response as it always was
    plain = client.post("/embeddings", json={"input": texts}).json()
    assert "embeddings" not in plain and "dense_vecs" in plain


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/embeddings", {"input": "a", "embedding_types": ["int4"]}, "embedding_types", None),
        ("/embeddings", {"input": "a", "embedding_types": []}, "embedding_types", None),
        (
            "/v1/embeddings",
            {"input": "a", "embedding_types": ["int8"], "dimensions": 8},
            "dimensions",
            None,
        ),
        (
            "/v1/embeddings",
            {"input": "a", "model": "noranges", "embedding_types": ["uint8"]},
            "embedding_types",
            "unsupported_output",
        ),
    ],
)
def test_refusals(path: str, body: dict[str, Any], param: str, code: str | None) -> None:
    client = TestClient(make_app(bge_m3_like(), NoRanges(model_id="noranges", aliases=())))
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and (code is None or error["code"] == code)
    # binary types need no ranges
    ok = client.post(
        "/embeddings", json={"input": "a", "model": "noranges", "embedding_types": ["binary"]}
    )
    assert ok.status_code == 200 and list(ok.json()["embeddings"]) == ["binary"]


def test_openai_extension_through_the_client() -> None:
    fake = bge_m3_like()
    with LiveServer(make_app(fake)) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        response = client.embeddings.create(
            model="bge-m3",
            input=["a b", "c"],
            encoding_format="float",
            extra_body={"embedding_types": ["int8", "binary"]},
        )
    dense = np.stack([fake.expected_dense(t) for t in ["a b", "c"]])
    want = compact(dense, ["int8", "binary"], fake.embedding_ranges)
    for i, item in enumerate(response.data):
        np.testing.assert_allclose(item.embedding, dense[i], rtol=0, atol=1e-7)
        extra = item.model_extra or {}
        assert extra["embeddings"]["int8"] == want["int8"][i].tolist()
        assert extra["embeddings"]["binary"] == want["binary"][i].tolist()


@pytest.mark.slow
def test_the_build_calibrates_the_ranges(tiny_fp32: Path, tmp_path: Path) -> None:
    from handler.engine import Engine, EngineConfig
    from model_build import ranges, validate

    manifest = json.loads((tiny_fp32 / "manifest.json").read_text(encoding="utf-8"))
    section = manifest[RANGES_SECTION]
    dims = manifest["dims"] if "dims" in manifest else len(section["min"])
    assert len(section["min"]) == len(section["max"]) == dims
    assert section["set"] == "calibration.jsonl" and section["texts"] > 50
    engine = Engine.load(tiny_fp32, EngineConfig(warmup=False))
    got = engine.embedding_ranges
    assert got is not None
    texts = [item.text for item in validate.load_text_set(validate.CALIBRATION_SET)]
    dense = engine.encode(texts).dense
    assert dense is not None
    np.testing.assert_array_equal(got.low, dense.min(axis=0))
    np.testing.assert_array_equal(got.high, dense.max(axis=0))
    # The CLI adds the same section to an artifact that lacks it
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_fp32, copy)
    del manifest[RANGES_SECTION]
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert Engine.load(copy, EngineConfig(warmup=False)).embedding_ranges is None
    assert ranges.main([str(copy)]) == 0
    again = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))[RANGES_SECTION]
    assert again == section


def test_the_names_are_cohere_s() -> None:
    assert tuple(TYPES) == EMBEDDING_TYPES
