"""Corpus jobs against S3 served by moto in-process (`mock_aws`): the CLI with s3:// input and
output, and the Distributed Map worker (`handler.batch.lambda_function.handler`) called with the
child-workflow inputs Step Functions sends (tests/data/stepfunctions_events, shapes in SOURCES.txt).
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from handler.batch import __main__ as cli
from handler.batch import lambda_function as worker
from handler.batch import locations
from handler.engine import EngineConfig, ModelRegistry, load_registry

pytestmark = pytest.mark.slow

EVENTS = Path(__file__).resolve().parent / "data" / "stepfunctions_events"
CORPUS, VECTORS = "bge-m3-corpus", "bge-m3-vectors"


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / name).read_text("utf-8"))
    return event


@dataclass
class LambdaContext:
    """What the worker reads from Lambda's context: the time left (it shrinks per call here)."""

    remaining_ms: int = 900_000
    step_ms: int = 0
    aws_request_id: str = "c6af9ac6-7b61-11e6-9a41-93e812345678"
    function_name: str = "bge-m3-batch-worker"

    def get_remaining_time_in_millis(self) -> int:
        self.remaining_ms -= self.step_ms
        return self.remaining_ms


@pytest.fixture(scope="module")
def models(tiny_fp32: Path) -> ModelRegistry:
    return load_registry([tiny_fp32], EngineConfig(warmup=False))


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tiny_fp32: Path) -> Iterator[Any]:
    from moto import mock_aws

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MODEL_PATH": str(tiny_fp32),
        "MODEL_VERIFY": "size",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws():
        locations.s3_client.cache_clear()
        client = boto3.client("s3")
        client.create_bucket(Bucket=CORPUS)
        client.create_bucket(Bucket=VECTORS)
        yield client
    locations.s3_client.cache_clear()


def put_jsonl(s3: Any, key: str, records: list[Any], extra: bytes = b"") -> None:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode() + extra
    s3.put_object(Bucket=CORPUS, Key=key, Body=body)


def keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in listed)


def parquet(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    rows: list[dict[str, Any]] = pq.read_table(io.BytesIO(body)).to_pylist()
    return rows


# ---- the CLI on S3 -------------------------------------------------------------------------------


def test_cli_reads_an_s3_prefix_and_writes_s3_parts(
    s3: Any, models: ModelRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    first = [{"id": f"a{i}", "text": f"first shard passage {i}"} for i in range(9)]
    second = [{"id": f"b{i}", "text": f"second shard passage {i}"} for i in range(4)]
    put_jsonl(s3, "corpus/shard-0.jsonl", first, extra=b'{"id": "bad", "text": 7}\n')
    put_jsonl(s3, "corpus/shard-1.jsonl", second)
    s3.put_object(Bucket=CORPUS, Key="corpus/_SUCCESS", Body=b"")  # written by Spark: not input

    args = [f"s3://{CORPUS}/corpus/", f"s3://{VECTORS}/out/", "--dense", "--sparse",
            "--rows-per-part", "6"]  # fmt: skip
    assert cli.main(args) == 0

    assert keys(s3, VECTORS, "out/") == [
        "out/_job.json",
        "out/_summary.json",
        "out/errors.jsonl",
        "out/part-000000.parquet",
        "out/part-000001.parquet",
        "out/part-000002.parquet",
    ]
    rows = [r for k in keys(s3, VECTORS, "out/part-") for r in parquet(s3, VECTORS, k)]
    assert [r["id"] for r in rows] == [r["id"] for r in first + second]
    expected = models.default.encode([r["text"] for r in first + second], sparse=True)
    assert expected.dense is not None and expected.sparse is not None
    np.testing.assert_allclose(
        np.array([r["dense"] for r in rows]), expected.dense, rtol=0, atol=1e-5
    )
    assert [r["sparse_indices"] for r in rows] == [sorted(w) for w in expected.sparse]
    errors = s3.get_object(Bucket=VECTORS, Key="out/errors.jsonl")["Body"].read().decode()
    assert [json.loads(line) for line in errors.splitlines()] == [
        {
            "source": "shard-0.jsonl",
            "line": 10,
            "id": "bad",
            "reason": "'text' is a number, not a string",
        }
    ]
    capsys.readouterr()

    # A re-run finds every part in the bucket and embeds nothing.
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert "3 part(s) were complete already and were skipped" in out.err
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert (summary["parts_skipped"], summary["parts_written"], summary["tokens"]) == (3, 0, 0)


def test_cli_reads_one_s3_object(s3: Any) -> None:
    put_jsonl(s3, "one.jsonl", [{"id": "x", "text": "only row"}])
    assert (
        cli.main([f"s3://{CORPUS}/one.jsonl", f"s3://{VECTORS}/single", "--format", "jsonl"]) == 0
    )
    body = s3.get_object(Bucket=VECTORS, Key="single/part-000000.jsonl")["Body"].read()
    (row,) = [json.loads(line) for line in body.decode().splitlines()]
    assert row["id"] == "x" and len(row["dense"]) == 32


# ---- the Distributed Map worker ------------------------------------------------------------------


def test_worker_embeds_a_json_lines_batch_and_retries_overwrite(
    s3: Any, models: ModelRegistry
) -> None:
    event = load_event("distributed_map_jsonl_batch.json")
    worker.engine_from_environment.cache_clear()

    result = worker.handler(copy.deepcopy(event), LambdaContext())

    digest = worker.batch_digest(event["Items"])
    part_key = f"vectors/job-1/part-{digest}.parquet"
    assert result["part"] == f"s3://{VECTORS}/{part_key}"
    assert (result["items"], result["rows"], result["errors"]) == (5, 4, 1)
    assert result["duplicates"] == 1  # items 0 and 4 share their text
    rows = parquet(s3, VECTORS, part_key)
    good = [i["value"] for i in event["Items"] if "text" in i["value"]]
    assert [r["id"] for r in rows] == [v["id"] for v in good]
    expected = models.default.encode([v["text"] for v in good], sparse=True)
    assert expected.dense is not None and expected.sparse is not None
    np.testing.assert_allclose(np.array([r["dense"] for r in rows]), expected.dense, atol=1e-5)
    for row, weights in zip(rows, expected.sparse, strict=True):
        assert row["sparse_indices"] == sorted(weights)
        np.testing.assert_allclose(
            row["sparse_values"], [weights[i] for i in sorted(weights)], atol=1e-5
        )
    errors = s3.get_object(Bucket=VECTORS, Key=f"vectors/job-1/errors-{digest}.jsonl")["Body"]
    assert [json.loads(line) for line in errors.read().decode().splitlines()] == [
        {"source": "item", "item": 2, "id": "doc-2", "reason": "'text' is missing"}
    ]
    # Step Functions retries a failed batch with the same items: same key, no second part.
    again = worker.handler(copy.deepcopy(event), LambdaContext())
    assert again["part"] == result["part"]
    assert keys(s3, VECTORS, "vectors/job-1/") == [
        f"vectors/job-1/errors-{digest}.jsonl",
        part_key,
    ]


def test_worker_csv_batch_with_dimensions_and_custom_fields(s3: Any, models: ModelRegistry) -> None:
    event = load_event("distributed_map_csv_batch.json")
    worker.engine_from_environment.cache_clear()
    result = worker.handler(event, LambdaContext())
    assert (result["rows"], result["errors"]) == (2, 1)
    rows = parquet(s3, VECTORS, result["part"].removeprefix(f"s3://{VECTORS}/"))
    assert [r["id"] for r in rows] == ["7", "9"]
    assert set(rows[0]) == {"id", "tokens", "dense"}
    got = np.array([r["dense"] for r in rows], dtype=np.float32)
    assert got.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_worker_reads_listed_shards_whole(s3: Any) -> None:
    put_jsonl(
        s3, "shards/shard-00000.jsonl", [{"id": f"s0-{i}", "text": f"zero {i}"} for i in range(3)]
    )
    second = [{"id": f"s1-{i}", "text": f"one {i}"} for i in range(2)]
    put_jsonl(s3, "shards/shard-00001.jsonl", second, extra=b"not json\n")
    worker.engine_from_environment.cache_clear()
    result = worker.handler(load_event("distributed_map_s3_listing_batch.json"), LambdaContext())
    assert (result["rows"], result["errors"]) == (5, 1)
    rows = parquet(s3, VECTORS, result["part"].removeprefix(f"s3://{VECTORS}/"))
    assert [r["id"] for r in rows] == ["s0-0", "s0-1", "s0-2", "s1-0", "s1-1"]
    assert all(r["sparse_indices"] for r in rows)


def test_worker_fails_clearly_when_the_batch_cannot_finish_in_time(s3: Any) -> None:
    event = load_event("distributed_map_jsonl_batch.json")
    worker.engine_from_environment.cache_clear()
    # Less time left than writing the part needs: nothing is embedded, nothing written.
    with pytest.raises(worker.BatchTooLargeError, match="lower MaxItemsPerBatch"):
        worker.handler(event, LambdaContext(remaining_ms=worker.RESERVE_MS - 1))
    assert keys(s3, VECTORS, "vectors/") == []


def test_worker_stops_between_chunks_when_time_runs_out(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN chunks of two rows and a clock that loses 20 s per look
    monkeypatch.setattr(worker, "CHUNK", 2)
    event = load_event("distributed_map_jsonl_batch.json")
    worker.engine_from_environment.cache_clear()
    context = LambdaContext(remaining_ms=worker.RESERVE_MS + 30_000, step_ms=20_000)
    # THEN the second chunk does not start, and the error names the rows left undone
    with pytest.raises(worker.BatchTooLargeError, match=r"rows 2\.\.3 of 4"):
        worker.handler(event, context)
    assert keys(s3, VECTORS, "vectors/") == []


def test_worker_rejects_an_event_without_items_or_output(s3: Any) -> None:
    worker.engine_from_environment.cache_clear()
    with pytest.raises(worker.BatchInputError, match="Items"):
        worker.handler({"BatchInput": {"output": f"s3://{VECTORS}/x/"}}, LambdaContext())
    with pytest.raises(worker.BatchInputError, match="output"):
        worker.handler({"Items": [{"text": "a"}], "BatchInput": {}}, LambdaContext())
