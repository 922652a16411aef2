"""Corpus jobs on one machine: `python -m handler.batch` run as a process on files the tests write,
with the tiny BGE-M3-layout model that conftest builds through `python -m model_build`.

What must hold: vectors equal the HTTP API's for the same text and options; bad lines never lose a
good row and each one lands in the errors file; a re-run skips complete parts and says so;
identical texts are embedded once; two Cloud Run tasks cover every row exactly once; the output
loads into a vector store (Qdrant's local mode).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fakes import LiveServer, settings

from handler.app import create_app
from handler.batch.rows import Fields, read_rows
from handler.engine import EngineConfig, ModelRegistry, load_registry

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

TEXTS = [
    "What is BGE M3?",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector "
    "interaction. It handles more than one hundred languages and inputs of up to 8192 tokens.",
    "如何使用torchserve部署模型",
    "Definition of BM25",
    "BM25 is a bag-of-words retrieval function that ranks documents by the query terms in each.",
]


def run_cli(
    args: Sequence[str], model: Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "MODEL_PATH": str(model), "MODEL_VERIFY": "size", **(env or {})}
    for name in ("CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_COUNT"):
        if env is None or name not in env:
            full_env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "handler.batch", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def summary_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    last = proc.stdout.strip().splitlines()[-1]
    record: dict[str, Any] = json.loads(last)
    assert record["event"] == "summary"
    return record


def write_jsonl(path: Path, records: Sequence[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def read_parts(folder: Path, suffix: str = ".parquet") -> pa.Table:
    parts = sorted(folder.glob(f"part-*{suffix}"))
    assert parts, f"no parts in {folder}"
    return pa.concat_tables([pq.read_table(p) for p in parts])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]


@pytest.fixture(scope="module")
def models(tiny_fp32: Path) -> ModelRegistry:
    return load_registry([tiny_fp32], EngineConfig(warmup=False))


@pytest.fixture(scope="module")
def api(models: ModelRegistry) -> Iterator[str]:
    with LiveServer(create_app(settings(), models)) as server:
        yield server.url


# ---- same vectors as the API ---------------------------------------------------------------------


def test_vectors_equal_the_native_api(tmp_path: Path, tiny_fp32: Path, api: str) -> None:
    # GIVEN the same texts, model and options (all three heads, max_length 24)
    source = write_jsonl(
        tmp_path / "in.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    )
    run_cli([str(source), str(tmp_path / "out"), "--dense", "--sparse", "--colbert",
             "--max-length", "24", "--rows-per-part", "2"], tiny_fp32)  # fmt: skip
    table = read_parts(tmp_path / "out").to_pylist()
    # WHEN the API embeds them in one request
    reply = httpx.post(
        f"{api}/embeddings",
        json={
            "input": TEXTS,
            "input_type": {"dense": True, "sparse": True, "colbert": True},
            "max_length": 24,
            "sparse_format": "indices_values",
        },
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    # THEN every head matches within 1e-5, row by row, in input order
    assert [r["id"] for r in table] == [f"t{i}" for i in range(len(TEXTS))]
    for row, dense, sparse, colbert in zip(
        table, body["dense_vecs"], body["sparse_vecs"], body["colbert_vecs"], strict=True
    ):
        np.testing.assert_allclose(row["dense"], dense, rtol=0, atol=1e-5)
        assert row["sparse_indices"] == sparse["indices"]
        np.testing.assert_allclose(row["sparse_values"], sparse["values"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.array(row["colbert"]), np.array(colbert), rtol=0, atol=1e-5)
    assert sum(r["tokens"] for r in table) == body["usage"]["total_tokens"]


def test_dimensions_equal_the_openai_api(tmp_path: Path, tiny_fp32: Path, api: str) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    run_cli(
        [str(source), str(tmp_path / "out"), "--dimensions", "16", "--format", "jsonl"], tiny_fp32
    )
    rows = read_jsonl(tmp_path / "out" / "part-000000.jsonl")
    reply = httpx.post(
        f"{api}/v1/embeddings",
        json={"input": TEXTS, "model": "bge-m3", "dimensions": 16, "encoding_format": "float"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    expected = [d["embedding"] for d in reply.json()["data"]]
    assert [r["id"] for r in rows] == [str(i) for i in range(len(TEXTS))]
    got = np.array([r["dense"] for r in rows], dtype=np.float32)
    assert got.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(got, np.array(expected, dtype=np.float32), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


# ---- bad input never loses good rows -------------------------------------------------------------


def test_bad_lines_in_the_middle_go_to_the_errors_file(tmp_path: Path, tiny_fp32: Path) -> None:
    # GIVEN a JSON Lines file whose middle holds every kind of bad line, between good ones
    good = [{"id": f"g{i}", "text": f"passage {i} about topic {i % 5}"} for i in range(24)]
    bad_lines = {
        b'{"id": "b1", "text": "unterminated\n': "bad JSON",
        b'["an", "array"]\n': "not a JSON object",
        b'{"id": "b3"}\n': "'text' is missing",
        b'{"id": "b4", "text": 42}\n': "'text' is a number, not a string",
        b'{"id": "b5", "text": "   "}\n': "'text' is empty",
        b'{"id": "b6", "text": null}\n': "'text' is missing",
        b'{"id": "b7", "text": "caf\xe9 latin-1"}\n': "not valid UTF-8",
        b'{"id": {"x": 1}, "text": "an id that is an object"}\n': "'id' is an object",
    }
    lines = [json.dumps(r).encode() + b"\n" for r in good[:10]]
    lines += list(bad_lines)
    lines += [b"\n"]  # a blank line is not a row and not an error
    lines += [json.dumps(r).encode() + b"\n" for r in good[10:]]
    source = tmp_path / "corpus.jsonl"
    source.write_bytes(b"".join(lines))
    bad_numbers = {n for n, line in enumerate(lines, start=1) if line in bad_lines}

    # WHEN the job runs with parts that cut through the bad lines
    proc = run_cli(
        [str(source), str(tmp_path / "out"), "--sparse", "--dense", "--rows-per-part", "7"],
        tiny_fp32,
    )

    # THEN every good row is in the output, in order, and every bad one is in the errors file
    table = read_parts(tmp_path / "out")
    assert table.column("id").to_pylist() == [r["id"] for r in good]
    assert all(len(v) == 32 for v in table.column("dense").to_pylist())  # tiny model: 32 dims
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert {e["line"] for e in errors} == bad_numbers
    by_line = {e["line"]: e for e in errors}
    for n, line in enumerate(lines, start=1):
        if line in bad_lines:
            assert by_line[n]["source"] == "corpus.jsonl"
            assert by_line[n]["reason"].startswith(bad_lines[line]), by_line[n]
    summary = summary_of(proc)
    assert (summary["rows"], summary["errors"]) == (len(good), len(bad_lines))
    assert summary["parts_written"] == 5  # 33 rows (good and bad) in parts of 7


def test_csv_and_parquet_inputs_with_bad_rows(tmp_path: Path, tiny_fp32: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    with (folder / "a.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["doc_id", "body"])
        writer.writerow(["c1", "first, with a comma"])
        writer.writerow(["c2", ""])  # empty text
        writer.writerow(["c3", "multi\nline text"])
        writer.writerow(["c4", "too", "many"])  # more fields than the header
        writer.writerow(["c5", "last"])
    pq.write_table(
        pa.table({"doc_id": ["p1", "p2", "p3"], "body": ["parquet one", None, "parquet three"]}),
        folder / "b.parquet",
    )
    run_cli(
        [str(folder), str(tmp_path / "out"), "--id-field", "doc_id", "--text-field", "body"],
        tiny_fp32,
    )
    assert read_parts(tmp_path / "out").column("id").to_pylist() == ["c1", "c3", "c5", "p1", "p3"]
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert [(e["source"], e.get("line", e.get("row")), e["id"]) for e in errors] == [
        ("a.csv", 3, "c2"),
        ("a.csv", 6, "a.csv:6"),
        ("b.parquet", 2, "p2"),
    ]
    assert "row" in errors[2] and "line" not in errors[2]


def test_rows_reader_numbers_lines_as_an_editor_does(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "bom"}\n\n{"text": "third line"}\nnot json\n')
    rows = list(read_rows(path, "x.jsonl", "jsonl", Fields()))
    assert [(r.number, r.id, r.ok) for r in rows] == [
        (1, "x.jsonl:1", True),
        (3, "x.jsonl:3", True),
        (4, "x.jsonl:4", False),
    ]


# ---- resumable, idempotent, duplicates once ------------------------------------------------------


def test_rerun_skips_complete_parts_and_redoes_missing_ones(
    tmp_path: Path, tiny_fp32: Path
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": f"text {i}"} for i in range(20)])
    out = tmp_path / "out"
    first = run_cli([str(source), str(out), "--rows-per-part", "8"], tiny_fp32)
    assert summary_of(first)["parts_written"] == 3
    before = {p.name: pq.read_table(p) for p in out.glob("part-*")}
    # A crash mid-part leaves at most a hidden temporary file, and a part missing.
    (out / "part-000001.parquet").unlink()
    (out / ".tmp-part-000001.parquet.abc").write_bytes(b"half a part")

    second = run_cli([str(source), str(out), "--rows-per-part", "8"], tiny_fp32)

    summary = summary_of(second)
    assert (summary["parts_written"], summary["parts_skipped"]) == (1, 2)
    assert "2 part(s) were complete already and were skipped" in second.stderr
    skipped = [json.loads(line) for line in second.stderr.splitlines() if '"skipped"' in line]
    assert {e["part"] for e in skipped} == {"part-000000.parquet", "part-000002.parquet"}
    after = {p.name: pq.read_table(p) for p in out.glob("part-*")}
    assert after.keys() == before.keys()
    for name, table in before.items():
        assert after[name].column("id").equals(table.column("id"))
        np.testing.assert_allclose(
            np.array(after[name].column("dense").to_pylist()),
            np.array(table.column("dense").to_pylist()),
            rtol=0,
            atol=1e-6,
        )

    # Other options into the same output would mix two jobs' parts: refused.
    clash = run_cli([str(source), str(out), "--rows-per-part", "5"], tiny_fp32, check=False)
    assert clash.returncode == 2
    assert "rows_per_part" in clash.stderr


def test_identical_texts_are_embedded_once(
    tmp_path: Path, tiny_fp32: Path, models: ModelRegistry
) -> None:
    texts = ["alpha beta", "gamma", "alpha beta", "delta epsilon zeta", "gamma", "alpha beta"]
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    proc = run_cli([str(source), str(tmp_path / "out"), "--rows-per-part", "2"], tiny_fp32)
    summary = summary_of(proc)
    engine = models.default
    distinct = sorted(set(texts))
    assert summary["duplicates"] == len(texts) - len(distinct)
    assert summary["tokens"] == engine.encode(distinct).total_tokens
    table = read_parts(tmp_path / "out")
    dense = np.array(table.column("dense").to_pylist())
    expected = engine.encode(texts).dense
    assert expected is not None
    np.testing.assert_allclose(dense, expected, rtol=0, atol=1e-5)


# ---- Cloud Run job tasks -------------------------------------------------------------------------


def test_two_cloud_run_tasks_cover_every_row_exactly_once(tmp_path: Path, tiny_fp32: Path) -> None:
    # GIVEN a folder of inputs (the Cloud Storage volume) with a bad line, and two tasks
    folder = tmp_path / "bucket" / "corpus"
    folder.mkdir(parents=True)
    records = [{"id": f"r{i}", "text": f"row {i} of the corpus"} for i in range(41)]
    write_jsonl(folder / "shard-a.jsonl", records[:23])
    (folder / "shard-b.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records[23:30]) + "{oops\n"
        + "".join(json.dumps(r) + "\n" for r in records[30:]), "utf-8"
    )  # fmt: skip
    out = tmp_path / "bucket" / "vectors"
    # WHEN each task runs with Cloud Run's variables
    for index in ("0", "1"):
        run_cli([str(folder), str(out), "--rows-per-part", "5"], tiny_fp32,
                env={"CLOUD_RUN_TASK_INDEX": index, "CLOUD_RUN_TASK_COUNT": "2"})  # fmt: skip
    # THEN together they wrote every good row exactly once, and the bad line once
    ids = read_parts(out).column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in records)
    assert len(ids) == len(set(ids))
    errors = [e for p in sorted(out.glob("errors-*.jsonl")) for e in read_jsonl(p)]
    assert [(e["source"], e["line"]) for e in errors] == [("shard-b.jsonl", 8)]
    assert sorted(p.name for p in out.glob("errors-*")) == [
        "errors-00000-of-00002.jsonl",
        "errors-00001-of-00002.jsonl",
    ]


# ---- into a vector store -------------------------------------------------------------------------


def test_output_loads_into_qdrant_local_mode(
    tmp_path: Path, tiny_fp32: Path, models: ModelRegistry
) -> None:
    from qdrant_client import QdrantClient
    from qdrant_client import models as qm

    source = write_jsonl(
        tmp_path / "in.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    )
    run_cli([str(source), str(tmp_path / "out"), "--dense", "--sparse"], tiny_fp32)
    table = read_parts(tmp_path / "out")

    client = QdrantClient(path=str(tmp_path / "qdrant"))  # local mode: no server
    dims = len(table.column("dense")[0])
    client.create_collection(
        "passages",
        vectors_config={"dense": qm.VectorParams(size=dims, distance=qm.Distance.COSINE)},
        sparse_vectors_config={"sparse": qm.SparseVectorParams()},
    )
    client.upsert(
        "passages",
        points=[
            qm.PointStruct(
                id=n,
                vector={
                    "dense": row["dense"],
                    "sparse": qm.SparseVector(
                        indices=row["sparse_indices"], values=row["sparse_values"]
                    ),
                },
                payload={"id": row["id"]},
            )
            for n, row in enumerate(table.to_pylist())
        ],
    )
    assert client.count("passages").count == len(TEXTS)
    query = models.default.encode([TEXTS[3]], sparse=True)
    assert query.dense is not None and query.sparse is not None
    dense_hit = client.query_points(
        "passages", query=query.dense[0].tolist(), using="dense", limit=1
    )
    assert dense_hit.points[0].payload == {"id": "t3"}
    weights = query.sparse[0]
    sparse_hit = client.query_points(
        "passages",
        query=qm.SparseVector(
            indices=sorted(weights), values=[weights[i] for i in sorted(weights)]
        ),
        using="sparse",
        limit=1,
    )
    assert sparse_hit.points[0].payload == {"id": "t3"}
    client.close()


def test_gpu_setting_falls_back_to_cpu_with_a_warning(tmp_path: Path, tiny_fp32: Path) -> None:
    # The GPU image sets DEVICE=cuda; where onnxruntime has no CUDA provider the job still runs.
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": TEXTS[0]}])
    proc = run_cli([str(source), str(tmp_path / "out")], tiny_fp32, env={"DEVICE": "cuda"})
    assert "falling back to CPU" in proc.stderr
    assert read_parts(tmp_path / "out").column("id").to_pylist() == ["a"]


def test_progress_bar_on_a_terminal(tmp_path: Path, tiny_fp32: Path) -> None:
    # stderr is a pseudo-terminal here, as in an interactive shell: a bar, not JSON lines.
    import pty

    source = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    controller, terminal = pty.openpty()
    env = {**os.environ, "MODEL_PATH": str(tiny_fp32), "MODEL_VERIFY": "size"}
    env.pop("TQDM_DISABLE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "handler.batch", str(source), str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:  # EIO: the process closed its side
            break
        if not data:
            break
        chunks.append(data)
    stdout, _ = proc.communicate(timeout=600)
    os.close(controller)
    assert proc.returncode == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert "rows/s" in shown and "tokens/s" in shown
    assert '"event": "part"' not in shown
    assert json.loads(stdout.strip().splitlines()[-1])["rows"] == len(TEXTS)


def test_the_job_runs_its_own_token_budget_not_the_apis(
    tiny_fp32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job's passes are always full, so its budget sets its peak memory: JOB_BATCH_TOKEN_BUDGET
    # (default 4096), whatever BATCH_TOKEN_BUDGET the API in the same environment uses.
    from handler.batch.__main__ import load_engine
    from handler.settings import Settings

    monkeypatch.setenv("BATCH_TOKEN_BUDGET", "16384")
    assert load_engine(Settings(), str(tiny_fp32), None).config.batch_token_budget == 4096
    monkeypatch.setenv("JOB_BATCH_TOKEN_BUDGET", "512")
    assert load_engine(Settings(), str(tiny_fp32), None).config.batch_token_budget == 512
