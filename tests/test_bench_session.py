"""The session probes of docs/memory-and-session.md, run as a reader runs them (tiny fixture)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.optimized_graph import RECORD
from tests.conftest import REPO_ROOT


def run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def test_session_memory_reports_each_variant(tiny_int8: Path) -> None:
    out = run(
        "bench.session_memory", str(tiny_int8), "--rounds", "1", "--reps", "1",
        "--variants", "base,trim",
    )  # fmt: skip
    summary = json.loads(out)

    assert set(summary) == {"base", "trim"}
    assert "release_heap_ms" in summary["trim"] and "release_heap_ms" not in summary["base"]
    for figures in summary.values():
        assert figures["after_load_rss_mib"] > 0
        assert figures["after_load_anon_mib"] + figures["after_load_file_mib"] > 0
        assert figures["p50_9tok_ms"] > 0 and figures["p50_128tok_ms"] > 0


def test_saved_graphs_give_the_artifacts_outputs_on_the_cpu_that_saved_them(
    tiny_int8: Path, tmp_path: Path
) -> None:
    run("bench.prepack_isa", "save", str(tiny_int8), str(tmp_path))
    result = json.loads(run("bench.prepack_isa", "compare", str(tiny_int8), str(tmp_path)))

    for graph in ("prepacked.onnx", "extended.onnx"):
        assert set(result[graph]) == {"dense", "sparse", "colbert"}
        assert all(d == 0.0 for d in result[graph].values())


def test_damaged_blobs_move_the_outputs_on_the_cpu_that_packed_them(
    tiny_int8: Path, tmp_path: Path
) -> None:
    # The probe behind the cross-CPU table: on the CPU that packed them the blobs are used as they
    # are (onnxruntime checks their key, not their bytes), so damaged ones must show.
    saved, bad = tmp_path / "saved", tmp_path / "bad"
    run("bench.prepack_isa", "save", str(tiny_int8), str(saved))
    damage = json.loads(run("bench.prepack_isa", "corrupt", str(saved), str(bad)))
    assert damage["corrupted_blobs"] > 0 and all(n > 0 for n in damage["blob_sizes"])
    result = json.loads(run("bench.prepack_isa", "compare", str(tiny_int8), str(bad)))

    assert max(result["prepacked.onnx"].values()) > 0.0
    assert all(d == 0.0 for d in result["extended.onnx"].values())  # no blobs: untouched


def test_the_build_optimized_graph_bench_times_each_variant_on_the_same_outputs(
    tiny_int8: Path, tmp_path: Path
) -> None:
    # GIVEN a copy of the artifact's graph optimized again by the build's stage
    out = tmp_path / "optimized"
    record = json.loads(run("bench.optimized_graph", "prepare", str(tiny_int8), str(out)))
    assert record["level"] == "extended" and record["provider"] == "CPUExecutionProvider"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx_data", RECORD]
    # WHEN both are timed in fresh processes, with one more load level for the copy
    timed = run(
        "bench.optimized_graph", "time", str(tiny_int8), str(out),
        "--rounds", "1", "--queries", "3", "--threads", "1", "--levels", "ORT_ENABLE_BASIC",
    )  # fmt: skip
    summary = json.loads(timed)
    # THEN each ran at the level the engine (or --levels) chose, with the same outputs
    levels = {name: runs[0]["level"] for name, runs in summary["runs"].items()}
    assert list(levels.values()) == ["ORT_DISABLE_ALL", "ORT_DISABLE_ALL", "ORT_ENABLE_BASIC"]
    for runs in summary["runs"].values():
        assert runs[0]["session_ms"] > 0 and runs[0]["query_p50_ms"] > 0
    differences = summary["max_abs_difference_vs_artifact_graph"]
    assert len(differences) == 2
    assert all(d <= 1e-6 for per_output in differences.values() for d in per_output)
