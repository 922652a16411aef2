"""The benchmark cannot rot: `python -m bench --smoke` runs every stage for every engine on the tiny
fixture, in a fresh process, and writes its JSON, markdown and plot. Nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

ENGINES = ("ours-int8", "ours-fp32", "ours-fp16", "ort-fp32", "ort-int8", "flagembedding")
STAGES = ("artifact", "cold_start", "warm_latency", "throughput", "long_text", "concurrency")
COLD_SPLIT = (
    "interpreter_ms",
    "imports_ms",
    "tokenizer_ms",
    "session_ms",
    "warmup_ms",
    "load_ms",
    "first_request_ms",
    "total_ms",
    "rss_after_load_mib",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    work = tmp_path_factory.mktemp("bench-work")
    out = tmp_path_factory.mktemp("bench-out")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--work-dir", str(work), "--out", str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stderr (tail)\n{proc.stderr[-6000:]}"
    docs = [p for p in out.glob("*-smoke.json")]
    assert len(docs) == 1, sorted(p.name for p in out.iterdir())
    return json.loads(docs[0].read_text()), out


@pytest.mark.slow
def test_every_engine_has_every_stage_without_errors(smoke: tuple[dict[str, Any], Path]) -> None:
    doc, _ = smoke
    assert doc["mode"] == "smoke"
    assert set(doc["engines"]) == set(ENGINES)
    for name, res in doc["engines"].items():
        for stage in STAGES:
            assert isinstance(res.get(stage), dict), f"{name}: no {stage}"
            assert not res[stage].get("error"), f"{name}/{stage}: {res[stage]['error']}"
        assert res["artifact"]["ok"], name


@pytest.mark.slow
def test_stage_contents(smoke: tuple[dict[str, Any], Path]) -> None:
    doc, _ = smoke
    cfg = doc["config"]
    for name, res in doc["engines"].items():
        # GIVEN the cold start of a new process: every part of the split is reported
        cold = res["cold_start"]
        assert all(key in cold for key in COLD_SPLIT), (name, sorted(cold))
        if name.startswith("ours-"):
            # the engine's own timings, read from the engine the Lambda handler loaded
            assert all(cold[k] is not None for k in ("tokenizer_ms", "session_ms", "warmup_ms"))
            assert cold["engine_loaded"] == "at import"
            assert "handler_9 tokens" in res["warm_latency"]
        # warm latency for every text size, with p50 and p95
        for item in cfg["latency"]:
            lat = res["warm_latency"][item["name"]]
            assert lat["n"] == item["reps"] and lat["p95_ms"] >= lat["p50_ms"] > 0
        # throughput counted in tokens: exactly what the texts were made to hold, in every engine
        for item in cfg["throughput"]:
            tput = res["throughput"][item["name"]]
            assert tput["tokens"] == item["texts"] * item["tokens_each"], (name, tput)
            assert tput["tokens_per_s"] > 0
        long = res["long_text"]
        assert long["tokens"] == cfg["long"]["tokens"], (name, long)
        assert long["peak_rss_mib"] >= long["rss_before_mib"] > 0
        # concurrency: our app under uvicorn, every level, every request answered 200
        if name.startswith("ours-"):
            levels = res["concurrency"]["levels"]
            assert sorted(int(k) for k in levels) == cfg["concurrency"]["levels"]
            for level in levels.values():
                assert level["ok"] == level["planned"] > 0, level
                assert level["statuses"] == {"200": level["planned"]}
        else:
            assert res["concurrency"].get("skipped")


@pytest.mark.slow
def test_ratios_targets_machine_and_files(smoke: tuple[dict[str, Any], Path]) -> None:
    doc, out = smoke
    for ours in ("ours-int8", "ours-fp32", "ours-fp16"):
        assert set(doc["ratios"][ours]) == {"ort-fp32", "ort-int8", "flagembedding"}
        assert all(v is not None for v in doc["ratios"][ours]["ort-int8"].values())
    assert "RSS after load" in {t["target"] for t in doc["targets"]}
    assert "bge-m3-lite int8" in doc["skipped_engines"]  # full size only, with the reason
    assert "lite-int8" not in doc["engines"]
    machine = doc["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["versions"]["onnxruntime"]
    stem = next(out.glob("*-smoke.json")).stem
    for name in (f"{stem}.md", f"{stem}.png", "latest.md", "latest.png", "latest.json"):
        assert (out / name).is_file(), name
    for png in (out / f"{stem}.png", out / "latest.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "latest.md").read_text()
    assert "| ours int8 " in table.replace("**", "") and "FlagEmbedding" in table
    assert "latest.png" in table
