"""The cold start inside the Lambda image (bench/image_start.py): what bench/image_start.sh prints
is parsed into runs and summarised per page-cache state; the worker's `cold` job that runs inside
the container answers in that protocol (run here on the host); and, with Docker, the whole thing on
the tiny model. Nothing here asserts on time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import image_start, report
from tests.conftest import REPO_ROOT


def cold_result(total_ms: float, t0: float) -> str:
    cold = {
        "imports_ms": 900.0,
        "tokenizer_ms": 100.0,
        "session_ms": 400.0,
        "warmup_ms": 50.0,
        "load_ms": 500.0,
        "first_request_ms": 30.0,
        "interpreter_ms": 40.0,
        "total_ms": total_ms,
        "peak_rss_mib": 700.0,
        "t0_epoch_s": t0,
    }
    return "BENCH_RESULT " + json.dumps({"job": "cold", "cold_start": cold})


TRANSCRIPT = [
    "IMAGE_START_INFO storage_driver overlay2",
    "IMAGE_START_INFO image_built reused",
    "IMAGE_START_INFO image_size_bytes 1234567",
    "IMAGE_START_RUN 0 prime none 100.0",
    cold_result(1000.0, 100.5),
    "IMAGE_START_END 0 prime 0 101.6",
    "IMAGE_START_RUN 1 cold page-cache:all 200.0",
    "some library printed this",
    cold_result(3000.0, 200.25),
    "IMAGE_START_END 1 cold 0 203.5",
    "IMAGE_START_RUN 1 warm none 300.0",
    cold_result(1000.0, 300.5),
    "IMAGE_START_END 1 warm 0 301.6",
    "IMAGE_START_RUN 2 cold page-cache:all 400.0",
    "Traceback (most recent call last):",
    "MemoryError",
    "IMAGE_START_END 2 cold 1 401.0",
    "IMAGE_START_RUN 2 warm none 500.0",
    cold_result(2000.0, 500.5),
    "IMAGE_START_END 2 warm 0 502.6",
    "IMAGE_START_RUN 2 host none 600.0",
    cold_result(1200.0, 600.0),
    "IMAGE_START_END 2 host 0 601.2",
]


def test_transcript_parses_into_runs_with_the_container_start() -> None:
    # GIVEN the script's stdout: info lines, an untimed prime run, a failed run, library noise
    info, runs = image_start.parse_output(line + "\n" for line in TRANSCRIPT)
    # THEN the info is typed, every run is found in order, and noise stays with its run
    assert info == {
        "storage_driver": "overlay2",
        "image_built": "reused",
        "image_size_bytes": 1234567,
    }
    assert [(r.round, r.state) for r in runs] == [
        (0, "prime"), (1, "cold"), (1, "warm"), (2, "cold"), (2, "warm"), (2, "host")
    ]  # fmt: skip
    records = [r.to_json() for r in runs]
    cold = records[1]
    # AND the container's own start is the host's t0 to the interpreter's (one kernel clock)
    assert cold["container_start_ms"] == pytest.approx(250.0)
    assert cold["docker_run_to_200_ms"] == pytest.approx(3250.0)
    assert "t0_epoch_s" not in cold and cold["evicted"] == "page-cache:all"
    # AND a run without a result is an error carrying its exit status and last output
    assert "exit status 1" in records[3]["error"] and "MemoryError" in records[3]["error"]
    # AND a run on the host has no container start
    assert "container_start_ms" not in records[5] and records[5]["total_ms"] == 1200.0


def test_summary_is_the_median_per_state_without_the_prime_run() -> None:
    _, runs = image_start.parse_output(TRANSCRIPT)
    summary = image_start.summarize([r.to_json() for r in runs])
    assert set(summary) == {"cold", "warm", "cold-model", "host"}
    warm, cold = summary["warm"], summary["cold"]
    assert warm["n"] == 2 and warm["median"]["total_ms"] == 1500.0
    assert warm["total_ms_runs"] == [1000.0, 2000.0]
    assert warm["median"]["container_start_ms"] == 500.0
    assert cold["n"] == 1 and cold["median"]["total_ms"] == 3000.0
    assert cold["errors"] and cold["errors"][0].startswith("round 2:")
    assert "drop_caches" in cold["evicted"]
    # AND a state that never ran has no figures rather than made-up ones
    assert summary["cold-model"]["n"] == 0 and summary["cold-model"]["median"]["total_ms"] is None


def test_report_renders_the_states_and_a_skip() -> None:
    _, runs = image_start.parse_output(TRANSCRIPT)
    records = [r.to_json() for r in runs]
    doc = {"image_start": {"states": image_start.summarize(records), "rounds": 2, "info": {}}}
    text = "\n".join(report.image_start_lines(doc))
    assert "| cold |" in text and "| warm |" in text and "3.00 s" in text
    skipped = "\n".join(report.image_start_lines({"image_start": {"skipped": "needs root"}}))
    assert "skipped: needs root" in skipped


def test_evict_files_counts_what_it_could_open(tmp_path: Path) -> None:
    present = tmp_path / "model.onnx"
    present.write_bytes(b"\0" * 4096)
    assert image_start.evict_files([str(present), str(tmp_path / "missing")]) == 1


def test_same_model_and_code_give_the_same_tag(tiny_int8: Path) -> None:
    assert image_start.image_tag(tiny_int8) == image_start.image_tag(tiny_int8)
    assert image_start.image_tag(tiny_int8).startswith("bge-m3-bench/lambda:")


@pytest.mark.slow
def test_worker_cold_job_answers_in_the_protocol(tiny_int8: Path) -> None:
    # GIVEN the worker's `cold` job, as the container runs it (MODEL_PATH, the spec in argv)
    spec = {"engine": "ours-int8", "kind": "ours", "job": "cold", "query": image_start.QUERY}
    env = {**os.environ, "MODEL_PATH": str(tiny_int8), "MODEL_VERIFY": "size"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.worker", json.dumps(spec)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # WHEN its stdout is framed as the script frames it
    lines = [
        "IMAGE_START_RUN 1 warm none 0.0",
        *proc.stdout.splitlines(),
        "IMAGE_START_END 1 warm 0 1",
    ]
    _, runs = image_start.parse_output(lines)
    record = runs[0].to_json()
    # THEN the run has the host's whole split, from the first 200 through the handler
    assert "error" not in record, record
    for key in (
        "interpreter_ms",
        "imports_ms",
        "tokenizer_ms",
        "session_ms",
        "load_ms",
        "total_ms",
    ):
        assert isinstance(record[key], float), key
    assert record["path"].startswith("Lambda handler") and record["dims"] > 0


@pytest.mark.docker
def test_image_start_on_the_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "image-start.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench.image_start", "--smoke", "--rounds", "1",
            "--work-dir", str(tmp_path / "work"), "--out", str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    doc = json.loads(out.read_text())
    for state in image_start.STATES:
        assert doc["states"][state]["n"] == 1, doc["states"][state]
        assert doc["states"][state]["median"]["total_ms"] is not None
