"""The build's text sets (model_build/data) and the pure helpers of the pipeline: no model runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from handler.engine.manifest import SourceSection, Thresholds
from model_build import lexical, real_reference
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
    QUERY_CHARS,
    VALIDATION_SET,
    TextItem,
    load_text_set,
    query_of,
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


def _near_ties(count: int = 12, seed: int = 3) -> tuple[dict[int, float], dict[int, float]]:
    """Weights as a random-weight model gives them (every token about 0.3), and the same weights
    0.1% off, as a faithful int8 build gives them."""
    rng = np.random.default_rng(seed)
    reference = {100 + t: 0.3 + float(rng.normal(0, 1e-4)) for t in range(count)}
    candidate = {t: w * (1 + float(rng.normal(0, 1e-3))) for t, w in reference.items()}
    return reference, candidate


def test_sparse_measures_are_stable_under_near_ties() -> None:
    texts_ref, texts_cand = zip(*(_near_ties(seed=s) for s in range(20)), strict=True)
    # GIVEN near-tied weights: the five heaviest ids of most texts change with a 0.1% error
    identical = [
        set(lexical.top_ids(r, 5)) == set(lexical.top_ids(c, 5))
        for r, c in zip(texts_ref, texts_cand, strict=True)
    ]
    assert sum(identical) / len(identical) < 0.9
    # THEN the lexical scores and the weighted top overlap see a 0.1% error, and the gate passes
    figures = lexical.sparse_figures(texts_ref, texts_cand, texts_ref, texts_cand)
    limits = Thresholds()
    assert figures.lexical_error < 0.005 <= limits.max_lexical_error
    assert figures.top_overlap_mean > 0.99 >= limits.min_sparse_overlap
    assert figures.pairs == 400 and figures.top5_identical == sum(identical) / len(identical)


def test_sparse_measures_catch_a_damaged_head() -> None:
    rng = np.random.default_rng(7)
    texts_ref = [
        dict(zip(rng.choice(5000, 30).tolist(), rng.uniform(0, 0.3, 30).tolist(), strict=True))
        for _ in range(20)
    ]
    # GIVEN a head whose weights are off by 25% (noise), another that lost its weakest half
    noisy = [{t: w * (1 + 0.25 * float(rng.normal())) for t, w in r.items()} for r in texts_ref]
    halved = [{t: w for t, w in r.items() if w > 0.15} for r in texts_ref]
    limits = Thresholds()
    for damaged in (noisy, halved):
        figures = lexical.sparse_figures(texts_ref, damaged, texts_ref, damaged)
        # THEN the gate refuses on the lexical score error
        assert figures.lexical_error > limits.max_lexical_error, figures


def test_top_overlap_and_top_ids() -> None:
    assert lexical.top_ids({1: 0.5, 2: 0.9, 3: 0.9, 4: 0.1, 5: 0.3, 6: 0.2}, k=3) == [2, 3, 1]
    # a token that left the top list still counts with its weight on the other side
    reference = {1: 0.5, 2: 0.4, 3: 0.39}
    candidate = {1: 0.5, 2: 0.39, 3: 0.4}
    assert lexical.top_overlap(reference, candidate, k=2) == pytest.approx(1.28 / 1.30)
    assert lexical.top_overlap({}, {}) == 1.0
    assert lexical.top_overlap({1: 0.5}, {}) == 0.0


def test_score_errors_of_empty_rows() -> None:
    reference = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert lexical.score_errors(reference, reference).tolist() == [0.0, 0.0]
    wrong = np.array([[0.5, 0.0], [1.0, 0.5]])
    assert lexical.score_errors(reference, wrong).tolist() == [1.0, 0.25]
    assert lexical.total_score_error(reference, wrong) == pytest.approx(1.0 / 2.0)


def test_queries_are_the_opening_words() -> None:
    text = "The quick brown fox jumps over the lazy dog and keeps running far away from here"
    query = query_of(text)
    assert text.startswith(query) and len(query) <= QUERY_CHARS and not query.endswith(" ")
    assert query_of("短い") == "短い"
    assert query_of("漢" * 100) == "漢" * QUERY_CHARS


def test_real_model_check_applies_only_to_the_pinned_bge_m3() -> None:
    pinned = SourceSection(repo=BGE_M3_REPO, revision=PINNED_REVISION)
    assert real_reference.skip_reason(pinned) is None
    for other in (
        SourceSection(repo=BGE_M3_REPO, revision="0" * 40),
        SourceSection(repo="someone/bge-m3-copy", revision=PINNED_REVISION),
        SourceSection(local_dir="/models/bge-m3"),
    ):
        reason = real_reference.skip_reason(other)
        assert reason is not None and "do not apply" in reason
    recorded = real_reference.load_recorded()
    assert len(recorded.sentences) == len(recorded.weights) == 11
    assert recorded.weights[9] == {}  # the empty text has no lexical weights


def test_int8_measurements_are_the_benchmarks_own() -> None:
    """The one data file the int8 report cites holds the benchmark's entries unchanged."""
    from model_build.int8 import report

    data = report.measurements()
    results = Path(__file__).resolve().parent.parent / "bench" / "results"
    accuracy = json.loads((results / "int8_forms_accuracy.json").read_text())
    speed = json.loads((results / "int8_forms_speed.json").read_text())
    rerun = json.loads((results / "int8_forms_speed_rerun.json").read_text())
    for key, figures in data["accuracy_dense_cosine"].items():
        assert accuracy[key] == figures, key
    assert data["speed"] == speed
    assert {k: v for k, v in data["speed_rerun"].items() if k != "note"} == rerun
    assert data["chosen"]["accuracy"] in data["accuracy_dense_cosine"]
    assert data["chosen"]["speed"] in data["speed"]
    cited = report.cited_measurements()
    assert cited["chosen_accuracy_dense_cosine"] == accuracy[data["chosen"]["accuracy"]]
