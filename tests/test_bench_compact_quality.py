"""bench.compact_quality: the retrieval metrics on hand-made rankings, and the whole measurement
on real all-MiniLM-L6-v2 weights (conftest's `minilm_fp32`, whose build calibrated its int8
ranges) over a BEIR-layout set written here, where each query is one of the documents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import compact_quality
from model_build import validate


def test_ndcg_and_recall() -> None:
    judged = {"a": 2, "b": 1}
    assert compact_quality.ndcg_at_k(["a", "b", "c"], judged) == pytest.approx(1.0)
    swapped = (1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3))
    assert compact_quality.ndcg_at_k(["b", "a"], judged) == pytest.approx(swapped)
    assert compact_quality.recall_at_k(["x", "a"], judged) == 0.5
    assert compact_quality.ndcg_at_k(["x"] * 10, judged) == 0.0


def test_hamming_similarity_counts_equal_bits() -> None:
    q = np.packbits(np.array([[1, 0, 1, 1, 0, 0, 0, 1]], dtype=bool), axis=-1)
    d = np.packbits(np.array([[1, 0, 1, 1, 0, 0, 0, 1], [0, 1, 0, 0, 1, 1, 1, 0]], bool), axis=-1)
    assert compact_quality.hamming_similarity(q, d).tolist() == [[8, 0]]


@pytest.mark.slow
def test_measure_on_real_minilm(minilm_fp32: Path, tmp_path: Path) -> None:
    texts = [item.text for item in validate.load_text_set(validate.CALIBRATION_SET)]
    texts = list(dict.fromkeys(texts))  # a duplicate text would be two right answers
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text(
        "".join(
            json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts)
        ),
        encoding="utf-8",
    )
    (tmp_path / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(texts)),
        encoding="utf-8",
    )
    (tmp_path / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(texts))),
        encoding="utf-8",
    )
    results = compact_quality.measure(minilm_fp32, tmp_path, candidates=10)
    assert results["documents"] == results["queries"] == len(texts)
    figures = results["types"]
    # each query finds itself first in float; rescoring by float restores it for the others
    assert figures["float"]["ndcg@10"] == pytest.approx(1.0)
    assert figures["binary"]["rescored_ndcg@10"] == pytest.approx(1.0)
    assert figures["int8"]["rescored_recall@10"] >= figures["int8"]["recall@10"]
    assert {k: f["bytes_per_vector"] for k, f in figures.items()} == {
        "float": 384 * 4,
        "int8": 384,
        "binary": 48,
    }
    assert "| binary | 48 |" in compact_quality.table(results)
