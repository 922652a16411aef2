"""POST /tokenize and POST /decode (text-embeddings-inference's shapes): on the fake engine for
the shapes and errors, and on the real BGE-M3 tokenizer (conftest's `tiny_fp32` artifact) for the
ids of the 109 real cases (tests/data/tokenizer_cases.json) and for character offsets that equal
tokenizer.json's own, whichever backend serves."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from fakes import bge_m3_like, make_app, settings
from fastapi.testclient import TestClient

from handler.engine.manifest import load_manifest
from handler.engine.tokenizer import HuggingFaceBackend, SentencePieceBackend
from tests.conftest import DATA_DIR

CASES = json.loads((DATA_DIR / "tokenizer_cases.json").read_text(encoding="utf-8"))
KEY = "sk-tok"
AUTH = {"Authorization": f"Bearer {KEY}"}


def fake_client() -> TestClient:
    return TestClient(make_app(bge_m3_like(), api_key=KEY, max_inputs_native=3))


def test_tokenize_shape_and_offsets() -> None:
    client = fake_client()
    text = "  héllo   wörld "
    r = client.post("/tokenize", json={"inputs": text}, headers=AUTH)
    assert r.status_code == 200, r.text
    (tokens,) = r.json()
    assert [t["special"] for t in tokens] == [True, False, False, True]
    assert tokens[0] == {"id": 0, "text": "<s>", "special": True, "start": None, "stop": None}
    for token in tokens[1:-1]:
        assert set(token) == {"id", "text", "special", "start", "stop"}
        assert text[token["start"] : token["stop"]] == token["text"]
    bare = client.post(
        "/tokenize", json={"inputs": [text, "a"], "add_special_tokens": False}, headers=AUTH
    ).json()
    assert [[t["text"] for t in seq] for seq in bare] == [["héllo", "wörld"], ["a"]]


def test_decode_round_trip() -> None:
    client = fake_client()
    (tokens,) = client.post("/tokenize", json={"inputs": "paris is nice"}, headers=AUTH).json()
    ids = [t["id"] for t in tokens]
    r = client.post("/decode", json={"ids": ids}, headers=AUTH)
    assert r.status_code == 200 and r.json() == ["paris is nice"]
    kept = client.post(
        "/decode", json={"ids": [ids, ids[1:2]], "skip_special_tokens": False}, headers=AUTH
    )
    assert kept.json() == ["<s> paris is nice </s>", "paris"]


@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        ("/tokenize", {"inputs": []}, "empty_input", "inputs"),
        ("/tokenize", {"inputs": ["a"] * 4}, "too_many_inputs", "inputs"),
        ("/tokenize", {"inputs": 5}, "invalid_request", "inputs"),
        ("/tokenize", {"inputs": "a", "model": "nope"}, "model_not_found", "model"),
        ("/decode", {"ids": "12"}, "invalid_request", "ids"),
        ("/decode", {"ids": [[1], [2], [3], [4]]}, "too_many_inputs", "ids"),
    ],
)
def test_errors(path: str, body: dict[str, Any], code: str, param: str) -> None:
    r = fake_client().post(path, json=body, headers=AUTH)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param)


def test_auth_is_required() -> None:
    client = fake_client()
    assert client.post("/tokenize", json={"inputs": "a"}).status_code == 401
    assert client.post("/decode", json={"ids": [1]}).status_code == 401


# ---- the real BGE-M3 tokenizer --------------------------------------------------------------


def _random_texts(count: int) -> list[str]:
    rng = random.Random(20261204)
    pieces = ["<s>", "</s>", "<mask>", " ", "\t", "\n", "  ", "ﾊﾟ", "é", "👍🏽", "中文", "ﬁ", "Å"]
    return [
        "".join(
            rng.choice(pieces) if rng.random() < 0.3 else chr(rng.randint(0x20, 0x2FFF))
            for _ in range(rng.randint(1, 60))
        )
        for _ in range(count)
    ]


def _as_tuples(tokens: list[Any]) -> list[tuple[int, str, bool, int | None, int | None]]:
    return [(t.id, t.text, t.special, t.start, t.stop) for t in tokens]


@pytest.mark.slow
def test_sentencepiece_offsets_equal_tokenizer_json(tiny_fp32: Path) -> None:
    # GIVEN both backends over the real XLM-R vocabulary of the BGE-M3 artifact
    manifest = load_manifest(tiny_fp32)
    assert manifest.sentencepiece is not None
    hf = HuggingFaceBackend(tiny_fp32 / manifest.tokenizer_file)
    sp = SentencePieceBackend(
        tiny_fp32 / manifest.sentencepiece.model_file,
        tiny_fp32 / manifest.sentencepiece.frontend_file,
        cls=0,
        sep=2,
    )
    texts = [case["text"] for case in CASES] + _random_texts(200)
    for text in texts:
        for special in (True, False):
            # THEN the served backend gives tokenizer.json's ids, texts and character offsets
            served = sp.spans(text, special)
            assert _as_tuples(served) == _as_tuples(hf.spans(text, special)), text
            for token in served:
                if not token.special:
                    assert text[token.start : token.stop] == token.text
        ids = [t.id for t in hf.spans(text, True)]
        for skip in (True, False):
            assert sp.decode(ids, skip) == hf.decode(ids, skip), text


@pytest.mark.slow
def test_tokenize_route_gives_the_real_bge_m3_ids(tiny_fp32: Path) -> None:
    from handler.app import create_app
    from handler.engine import EngineConfig, load_registry

    models = load_registry([tiny_fp32], EngineConfig(warmup=False))
    client = TestClient(create_app(settings(), models))
    texts = [case["text"] for case in CASES]
    r = client.post("/tokenize", json={"inputs": texts})
    assert r.status_code == 200, r.text
    got = r.json()
    assert len(got) == len(CASES) == 109
    for case, tokens in zip(CASES, got, strict=True):
        assert [t["id"] for t in tokens] == case["ids"], case["text"]
        for token in tokens:
            if not token["special"]:
                assert case["text"][token["start"] : token["stop"]] == token["text"]
    # AND /decode reads the ids back: the normalised text, without the template's tokens
    decoded = client.post("/decode", json={"ids": [case["ids"] for case in CASES[:20]]}).json()
    again = client.post("/tokenize", json={"inputs": decoded}).json()
    assert [[t["id"] for t in seq] for seq in again] == [case["ids"] for case in CASES[:20]]
    bad = client.post("/decode", json={"ids": [5, 250_002]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "token_id_out_of_range"
