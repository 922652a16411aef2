"""The bench's job figure (`python -m bench --job`, bench/job.py) on a small plan: the corpus
has the token counts it claims, the CLI path and the API path both run on the same model and
corpus, and the report renders both, without asserting any speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import job
from bench.texts import TokenTexts

pytestmark = pytest.mark.slow


def test_job_figure_runs_both_paths(tmp_path: Path, bge_m3_source: Path, tiny_int8: Path) -> None:
    plan = job.JobPlan("tiny", 40, 16, 64, (8, 32), 16, 16, 300)
    corpus = tmp_path / "corpus.jsonl"
    total = job.make_corpus(plan, bge_m3_source, corpus)
    records = [json.loads(line) for line in corpus.read_text("utf-8").splitlines()]
    tt = TokenTexts(bge_m3_source / "tokenizer.json")
    counts = [tt.count(r["text"]) for r in records]
    assert len(records) == 40 and sum(counts) == total
    assert all(plan.min_tokens <= c <= plan.max_tokens for c in counts)

    cli = job.run_cli(tiny_int8, corpus, tmp_path / "out", plan)
    assert "error" not in cli, cli
    assert (cli["rows"], cli["tokens"], cli["parts"]) == (40, total, 3)

    texts = [r["text"] for r in records]
    api = job.run_api(tiny_int8, texts, plan, tmp_path / "server.log")
    assert "error" not in api, api
    # every batch size on the first 16 passages, then the best one on all 40
    assert set(api["batch_sizes"]) == {"8", "32"}
    assert all(
        (r["rows"], r["tokens"]) == (16, sum(counts[:16])) for r in api["batch_sizes"].values()
    )
    assert str(api["best_batch_size"]) in api["batch_sizes"]
    assert (api["best"]["rows"], api["best"]["tokens"]) == (40, total)
    assert cli["tokens_per_cpu_s"] > 0 and api["best"]["tokens_per_cpu_s"] > 0

    doc = {
        "mode": "smoke",
        "date": "2026-12-04T00:00:00+00:00",
        "model": "tiny int8",
        "machine": {"cpu": "test", "cores": 2},
        "corpus": {"passages": 40, "tokens": total, "min_tokens": 16, "max_tokens": 64},
        "cli": cli,
        "api": api,
        "cli_over_best_api": 1.0,
    }
    text = job.markdown(doc)
    assert "| CLI (`python -m handler.batch`, Parquet) |" in text
    assert "| API, one client, 32 per request | 16 |" in text and "Smoke run" in text
    assert "(best), whole corpus | 40 |" in text
