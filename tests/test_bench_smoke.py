"""The benchmark cannot rot: `python -m bench --smoke` runs every stage for every engine on the tiny
fixture, in a fresh process, and writes its JSON, markdown and plot. Nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.common import COLD_SPLIT_MS
from tests.conftest import REPO_ROOT

ENGINES = ("ours-int8", "ours-fp32", "ours-fp16", "ort-fp32", "ort-int8", "flagembedding")
STAGES = ("artifact", "cold_start", "warm_latency", "throughput", "long_text", "concurrency")
COLD_SPLIT = (*COLD_SPLIT_MS, "rss_after_load_mib")


@pytest.fixture(scope="module")
def smoke_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke run's work directory: its tiny models stay cached there for later runs."""
    return tmp_path_factory.mktemp("bench-work")


@pytest.fixture(scope="module")
def smoke(
    smoke_work: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    work = smoke_work
    out = tmp_path_factory.mktemp("bench-out")
    proc = subprocess.run(
        # The image stage builds a Docker image: tests/test_bench_image_start.py runs it (docker).
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--no-image-start",
            "--work-dir",
            str(work),
            "--out",
            str(out),
        ],
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
    assert doc["image_start"] == {"skipped": "--no-image-start"}
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
        # GIVEN the cold start of a new process, its model files read into the page cache first:
        # every part of the split is reported
        assert res["page_cache_mib"] > 0, name
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
            # the path around the model, both hosts (Lambda's also back to back), in the results
            # (and so in the report)
            for host in ("lambda", "lambda_back_to_back", "uvicorn"):
                fig = res["overhead"][host]
                assert fig["n"] == cfg["overhead_reps"] and fig["engine_p50_ms"] > 0, fig
        else:
            assert res["concurrency"].get("skipped")


@pytest.mark.slow
def test_ratios_targets_machine_and_files(smoke: tuple[dict[str, Any], Path]) -> None:
    doc, out = smoke
    for ours in ("ours-int8", "ours-fp32", "ours-fp16"):
        assert set(doc["ratios"][ours]) == {"ort-fp32", "ort-int8", "flagembedding"}
        assert all(v is not None for v in doc["ratios"][ours]["ort-int8"].values())
    named = {t["target"]: t for t in doc["targets"]}
    assert "RSS after load" in named
    # the overhead target reads the Lambda figure of the same run
    path = named["the path around the model, 9 tokens, Lambda handler (wall - stages p50)"]
    assert (
        path["measured"]
        == doc["engines"]["ours-int8"]["overhead"]["lambda"]["wall_minus_stages_p50_ms"]
    )
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


def _workers_under(work: Path) -> list[str]:
    """Command lines of live benchmark workers whose spec points into `work`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # the process ended while we looked
        if "bench.worker" in args and str(work) in " ".join(args):
            found.append(" ".join(args)[:200])
    return found


@pytest.mark.slow
def test_an_interrupted_run_stops_its_worker_and_keeps_the_last_results(
    smoke: tuple[dict[str, Any], Path], smoke_work: Path, tmp_path: Path
) -> None:
    # GIVEN the results of an earlier complete run, and a new run over the cached tiny models
    out = tmp_path / "results"
    out.mkdir()
    (out / "latest.json").write_text('{"earlier": "complete run"}\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--smoke", "--engines", "ours-int8",
         "--work-dir", str(smoke_work), "--out", str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # WHEN it is stopped while its worker measures
        seen.append(line)
        if "cold: ours-int8: first response" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[1]
    log = "".join(seen) + rest
    # THEN it exits 130, says so, stops its worker and leaves the earlier results as they were
    assert proc.returncode == 130, log[-4000:]
    assert "SIGTERM: stopping the workers; no results will be written" in log
    assert sorted(p.name for p in out.iterdir()) == ["latest.json"]
    assert json.loads((out / "latest.json").read_text()) == {"earlier": "complete run"}
    assert _workers_under(smoke_work) == []


def test_the_overhead_probe_runs_back_to_back_as_the_docs_say(
    tiny_int8: Path, tmp_path: Path
) -> None:
    # docs/overhead.md's back-to-back figures: the handler calls one after another, the engine's
    # after them, every figure still there (the calling thread's CPU included).
    out = tmp_path / "overhead.json"
    subprocess.run(
        [sys.executable, "-m", "bench.overhead", str(tiny_int8), "--reps", "5", "--no-uvicorn",
         "--back-to-back", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    fig = json.loads(out.read_text())["lambda"]
    assert fig["alternating"] is False and fig["n"] == 5
    assert fig["engine_p50_ms"] > 0 and fig["main_thread_cpu_p50_ms"] > 0


def test_the_overhead_split_reads_every_boundary_of_a_request(
    tiny_int8: Path, tmp_path: Path
) -> None:
    # docs/overhead.md's split: every boundary the probe wraps is crossed by a real handler call
    # (a renamed function or a path that skips one fails here), and the segments of each request
    # add up to its wall time minus its stages, so the p50 of the sums is bench.overhead's figure.
    out = tmp_path / "split.json"
    subprocess.run(
        [sys.executable, "-m", "bench.overhead_split", str(tiny_int8), "--reps", "5",
         "--alternate", "--evict-mb", "1", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    from bench.overhead_split import SEGMENTS

    fig = json.loads(out.read_text())
    assert fig["n"] == 5 and fig["alternating"] is True and fig["evict_mib"] == 1
    assert list(fig["segments_p50_us"]) == list(SEGMENTS)
    assert fig["wall_minus_stages_p50_us"] > 0
    # Clock readings in order: only the engine's segment has its stages taken out.
    assert all(
        us >= 0 for name, us in fig["segments_p50_us"].items() if name != "engine -> engine_done"
    )
