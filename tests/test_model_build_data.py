"""The build's text sets (model_build/data) and the pure helpers of the pipeline: no model runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from model_build.source import (
    BGE_M3_REPO,
    PINNED_REVISION,
    REQUIRED_FILES,
    default_revision,
    is_local_source,
    known_digests,
)
from model_build.tokenizer import prepare_tokenizer
from model_build.validate import (
    CALIBRATION_SET,
    VALIDATION_SET,
    TextItem,
    length_batches,
    lexical_weights,
    load_text_set,
    top_ids,
)

REQUIRED_LANGS = {"en", "zh", "ja", "ko", "ru", "ar", "hi", "de", "es", "fr"}


@pytest.fixture(scope="module")
def xlmr(bge_m3_source: Path) -> Tokenizer:
    """The artifact's tokenizer for the real XLM-R vocabulary (lengths as BGE-M3 counts them)."""
    return prepare_tokenizer(bge_m3_source).tokenizer


def _lengths(items: list[TextItem], tokenizer: Tokenizer) -> list[int]:
    return [len(e.ids) for e in tokenizer.encode_batch([i.text for i in items])]


def test_validation_set(xlmr: Tokenizer) -> None:
    items = load_text_set(VALIDATION_SET)
    assert len(items) >= 110
    langs = Counter(i.lang for i in items)
    assert set(langs) >= REQUIRED_LANGS and len(langs) >= 9
    assert all(langs[lang] >= 8 for lang in REQUIRED_LANGS), langs
    assert len({i.text for i in items}) == len(items), "duplicate texts"
    lengths = _lengths(items, xlmr)
    assert min(lengths) == 3, "needs one-token texts (<s> token </s>)"
    long_texts = [n for n in lengths if n > 1000]
    assert 3 <= len(long_texts) <= 8, long_texts  # a few long multi-paragraph texts
    assert all(n <= 8192 for n in lengths)
    # Spread in between: queries, sentences, paragraphs.
    assert sum(n <= 16 for n in lengths) >= 20
    assert sum(16 < n <= 128 for n in lengths) >= 50
    assert sum(128 < n <= 1000 for n in lengths) >= 5
    # Long texts are several distinct paragraphs, in more than one language.
    long_items = [i for i, n in zip(items, lengths, strict=True) if n > 1000]
    assert len({i.lang for i in long_items}) >= 3
    for item in long_items:
        paragraphs = [p for p in item.text.split("\n\n") if p.strip()]
        assert len(paragraphs) >= 5 and len(set(paragraphs)) == len(paragraphs)


def test_calibration_set(xlmr: Tokenizer) -> None:
    items = load_text_set(CALIBRATION_SET)
    assert len(items) >= 64
    assert len({i.text for i in items}) == len(items), "duplicate texts"
    langs = {i.lang for i in items}
    assert langs >= REQUIRED_LANGS
    lengths = _lengths(items, xlmr)
    assert max(lengths) <= 512 and min(lengths) <= 5
    assert sum(n > 64 for n in lengths) >= 15


def test_sets_do_not_overlap() -> None:
    validation = {i.text.strip() for i in load_text_set(VALIDATION_SET)}
    calibration = {i.text.strip() for i in load_text_set(CALIBRATION_SET)}
    assert not validation & calibration

    # Not even a shared paragraph.
    def paragraphs(texts: set[str]) -> set[str]:
        return {p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 40}

    assert not paragraphs(validation) & paragraphs(calibration)


def test_sets_are_well_formed_jsonl() -> None:
    for path in (VALIDATION_SET, CALIBRATION_SET):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            assert set(row) == {"lang", "text"} and row["text"].strip()


def test_known_digests_parse_the_lfs_pointers() -> None:
    digests = known_digests()
    assert digests["config.json"] == (
        "26159e7ad065073448460117eb24b7a4572f6f4e78eadff65dc0a11c052449fa",
        687,
    )
    assert digests["tokenizer.json"][1] == 17098108
    assert "onnx/tokenizer.json" in digests  # kept, but never downloaded by a recipe
    assert all(len(sha) == 64 for sha, _ in digests.values())


def test_source_defaults() -> None:
    assert default_revision(BGE_M3_REPO) == PINNED_REVISION
    assert default_revision("sentence-transformers/all-MiniLM-L6-v2") == "main"
    assert not is_local_source("BAAI/bge-m3")
    assert is_local_source("/definitely/not/here")
    assert is_local_source(str(Path(__file__).parent))
    assert ("colbert_linear.pt",) in REQUIRED_FILES["bge-m3"]


def test_length_batches_cover_every_text_once() -> None:
    lengths = [3, 1200, 50, 50, 8, 700, 9, 3000, 1]
    batches = length_batches(lengths, max_tokens=2048, max_batch=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 4
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 2048


def test_lexical_weights_and_top_ids() -> None:
    ids = [0, 10, 11, 10, 3, 12, 2, 1]
    weights = np.array([9.0, 0.2, 0.0, 0.5, 7.0, -1.0, 8.0, 6.0], dtype=np.float32)
    got = lexical_weights(ids, weights, {0, 1, 2, 3})
    assert got == {10: pytest.approx(0.5)}  # max per id; specials, zeros, negatives dropped
    assert top_ids({1: 0.5, 2: 0.9, 3: 0.9, 4: 0.1, 5: 0.3, 6: 0.2}, k=3) == {2, 3, 1}
