"""Metrics from the request record (the same one the log line is made of), two ways:

- `EmfMetrics` (Lambda): CloudWatch Embedded Metric Format, one EMF line per request on stdout,
  next to the JSON log line. CloudWatch extracts the metrics from the log; no agent, no API call
  in the request path.
- `PrometheusMetrics` (uvicorn: Cloud Run, containers): prometheus-client counters and histograms
  in the app's own registry, served at /metrics; plus what only a long-lived process has: requests
  in flight, micro-batch sizes and queue wait.

Labels and dimensions are few and bounded (docs/operations.md): route (the route template, never
the raw path), dialect, status, error code. Request ids and model names never become labels.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from handler.logging import RequestRecord, json_line
from handler.settings import Settings

# The engine's stages, in the order a request goes through them.
STAGES = ("tokenize", "queue", "infer", "post")
UNMATCHED_ROUTE = "unmatched"  # 404s: the raw path would be unbounded
# Seconds; from a cache-hot short query to a request at the edge of Lambda's time limit.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def route_of(record: RequestRecord) -> str:
    return record.route or UNMATCHED_ROUTE


class Metrics(Protocol):
    def request(self, record: RequestRecord, total_ms: float) -> None: ...

    def in_flight(self, count: int) -> None: ...


class NoMetrics:
    def request(self, record: RequestRecord, total_ms: float) -> None:
        pass

    def in_flight(self, count: int) -> None:
        pass


class PrometheusMetrics:
    """The series of docs/operations.md, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bge_m3_requests",
            "Requests answered, by route template, dialect and HTTP status (499: client gone).",
            ["route", "dialect", "status"],
            registry=r,
        )
        self.errors = Counter(
            "bge_m3_errors",
            "Error answers by machine-readable code (docs/operations.md lists them).",
            ["dialect", "code"],
            registry=r,
        )
        self.inputs = Counter("bge_m3_inputs", "Texts embedded or scored.", ["route"], registry=r)
        self.tokens = Counter("bge_m3_tokens", "Tokens the model ran.", ["route"], registry=r)
        self.cold_starts = Counter(
            "bge_m3_cold_starts", "First requests served by a new process.", registry=r
        )
        self.duration = Histogram(
            "bge_m3_request_duration_seconds",
            "Time from the request's arrival to its answer.",
            ["route", "dialect"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stages = Histogram(
            "bge_m3_stage_duration_seconds",
            "Time per engine stage of a request: tokenize, queue, infer, post.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "bge_m3_queue_wait_seconds",
            "Time a request waited for a micro-batch pass.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bge_m3_microbatch_requests",
            "Requests that shared a forward pass, seen by each request in it.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.in_flight_gauge = Gauge(
            "bge_m3_in_flight_requests",
            "Requests running the model now (MAX_CONCURRENT_REQUESTS caps it).",
            registry=r,
        )

    def request(self, record: RequestRecord, total_ms: float) -> None:
        route = route_of(record)
        self.requests.labels(route, record.dialect, str(record.status)).inc()
        self.duration.labels(route, record.dialect).observe(total_ms / 1000.0)
        if record.error_code is not None and record.status >= 400:
            self.errors.labels(record.dialect, record.error_code).inc()
        if record.cold_start:
            self.cold_starts.inc()
        if record.inputs is not None and record.status < 400:
            self.inputs.labels(route).inc(record.inputs)
        if record.tokens is not None and record.status < 400:
            self.tokens.labels(route).inc(record.tokens)
        for stage in STAGES:
            if stage in record.timings_ms:
                self.stages.labels(stage).observe(record.timings_ms[stage] / 1000.0)
        if "queue" in record.timings_ms:
            self.queue_wait.observe(record.timings_ms["queue"] / 1000.0)
        if record.batched_with is not None:
            self.batch_size.observe(record.batched_with + 1)

    def in_flight(self, count: int) -> None:
        self.in_flight_gauge.set(count)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class EmfMetrics:
    """One EMF document per request. Dimension sets: [service] (the totals the alarms watch),
    [service, Route, Dialect, Status], and [service, ErrorCode] for an error.

    The document is written here, to the EMF specification (CloudWatch, "Specification: Embedded
    metric format"), rather than through aws-lambda-powertools' `Metrics`: its shape is the same
    on every request, and powertools validated each of the ~11 values in an `add_metric` call
    before serializing them. That took 61 us per request against 13 us for this (warm), and on
    the full-size model, whose forward pass evicts the caches, about 0.25 ms of the main thread's
    1.1 ms of CPU around each request (docs/overhead.md)."""

    def __init__(self, namespace: str, service: str) -> None:
        self.namespace = namespace
        self.service = service

    def request(self, record: RequestRecord, total_ms: float) -> None:
        # stdout: where Lambda sends a function's output to CloudWatch Logs.
        print(json_line(self.document(record, total_ms)))

    def document(self, record: RequestRecord, total_ms: float) -> dict[str, Any]:
        dimensions = [["service"], ["service", "Route", "Dialect", "Status"]]
        values: dict[str, Any] = {
            "service": self.service,
            "Route": route_of(record),
            "Dialect": record.dialect,
            "Status": str(record.status),
        }
        if record.error_code is not None and record.status >= 400:
            dimensions.append(["service", "ErrorCode"])
            values["ErrorCode"] = record.error_code
        counts = {
            "Requests": 1,
            "ServerErrors": int(record.status >= 500),
            "Throttles": int(record.status == 429),
            "ColdStart": int(record.cold_start),
        }
        if record.status < 400:
            if record.inputs is not None:
                counts["Inputs"] = record.inputs
            if record.tokens is not None:
                counts["Tokens"] = record.tokens
        latencies = {
            f"Latency{stage.capitalize()}": record.timings_ms[stage]
            for stage in STAGES
            if stage in record.timings_ms
        }
        latencies["LatencyTotal"] = total_ms
        metrics = [{"Name": name, "Unit": "Count"} for name in counts]
        metrics += [{"Name": name, "Unit": "Milliseconds"} for name in latencies]
        directive = {"Namespace": self.namespace, "Dimensions": dimensions, "Metrics": metrics}
        return {
            "_aws": {"Timestamp": int(time.time() * 1000), "CloudWatchMetrics": [directive]},
            **values,
            **counts,
            **latencies,
            # High-cardinality values go in as properties: searchable in Logs Insights, not
            # metrics.
            "request_id": record.request_id,
        }

    def in_flight(self, count: int) -> None:
        pass  # one request per Lambda environment: always 0 or 1


def metrics_for(settings: Settings) -> Metrics:
    backend = settings.metrics_backend
    if backend == "emf":
        service = settings.aws_lambda_function_name or "bge-m3"
        return EmfMetrics(settings.metrics_namespace, service)
    if backend == "prometheus":
        return PrometheusMetrics()
    return NoMetrics()
