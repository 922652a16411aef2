"""Metrics on both platforms, read the way their consumers read them: the EMF documents the real
Lambda entry point prints (checked against the Embedded Metric Format specification), and /metrics
on uvicorn parsed with prometheus_client's own parser, its counters compared before and after
known requests."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fakes import LiveServer, bge_m3_like, make_app
from prometheus_client.parser import text_string_to_metric_families
from test_lambda import Context, load_event, with_request

import handler.lambda_function as entry
import handler.logging as request_logging

EMF_UNITS = {"Count", "Milliseconds", "Seconds", "Bytes", "None"}


def emf_documents(stdout: str) -> list[dict[str, Any]]:
    docs = []
    for line in stdout.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            docs.append(json.loads(line))
    return docs


def check_emf(doc: dict[str, Any]) -> None:
    """The structure the EMF specification requires of a document CloudWatch extracts from."""
    aws = doc["_aws"]
    assert isinstance(aws["Timestamp"], int)
    for directive in aws["CloudWatchMetrics"]:
        assert 1 <= len(directive["Namespace"]) <= 255
        assert directive["Dimensions"], "at least one dimension set"
        for dimension_set in directive["Dimensions"]:
            assert 1 <= len(dimension_set) <= 30
            for name in dimension_set:
                assert isinstance(doc[name], str) and doc[name], name
        for definition in directive["Metrics"]:
            assert definition["Unit"] in EMF_UNITS
            # A number, or an array of at most 100 numbers (values of one metric).
            value = doc[definition["Name"]]
            values = value if isinstance(value, list) else [value]
            assert 1 <= len(values) <= 100
            assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def value(doc: dict[str, Any], name: str) -> float:
    raw = doc[name]
    (one,) = raw if isinstance(raw, list) else [raw]
    return float(one)


@pytest.fixture
def lambda_app() -> Iterator[Any]:
    app = make_app(
        bge_m3_like(), metrics="emf", aws_lambda_function_name="bge-m3-fn", api_key="key"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(entry.handler, "app", app)
        yield app


def invoke(path: str, body: dict[str, Any], key: str | None = "key") -> tuple[dict[str, Any], str]:
    """The entry point's result and what it printed (where Lambda's stdout goes to CloudWatch)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    event = with_request(
        load_event("http_api_v2_post_json_powertools.json"), "POST", path, body, headers
    )
    request_logging.request_logger()  # its handler keeps the session's stdout, not this buffer
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result: dict[str, Any] = entry.handler(event, Context())
    return result, out.getvalue()


def test_emf_for_a_request_through_the_lambda_entry_point(lambda_app: Any) -> None:
    result, out = invoke("/v1/embeddings", {"model": "bge-m3", "input": ["one two", "three"]})
    assert result["statusCode"] == 200
    tokens = json.loads(result["body"])["usage"]["total_tokens"]
    (doc,) = emf_documents(out)
    check_emf(doc)
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "BgeM3"
    assert directive["Dimensions"] == [["service"], ["service", "Route", "Dialect", "Status"]]
    assert (doc["service"], doc["Route"], doc["Dialect"], doc["Status"]) == (
        "bge-m3-fn",
        "/v1/embeddings",
        "openai",
        "200",
    )
    units = {d["Name"]: d["Unit"] for d in directive["Metrics"]}
    assert units["Requests"] == "Count" and units["LatencyTotal"] == "Milliseconds"
    assert {"LatencyTokenize", "LatencyInfer", "LatencyPost"} <= set(units)
    got = [value(doc, n) for n in ("Requests", "Inputs", "Tokens", "ServerErrors")]
    assert got == [1, 2, tokens, 0]
    # The request id is a property for Logs Insights, never a dimension.
    assert doc["request_id"] == Context().aws_request_id
    assert all("request_id" not in s for s in directive["Dimensions"])


def test_emf_for_an_error_adds_its_code_as_a_dimension(lambda_app: Any) -> None:
    result, out = invoke("/embeddings", {"input": "x"}, key="wrong")
    assert result["statusCode"] == 401
    (doc,) = emf_documents(out)
    check_emf(doc)
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    assert ["service", "ErrorCode"] in directive["Dimensions"]
    assert doc["ErrorCode"] == "invalid_api_key" and doc["Status"] == "401"
    assert value(doc, "Requests") == 1 and "Inputs" not in doc


def scrape(
    url: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, frozenset[Any]], float]:
    r = httpx.get(f"{url}/metrics", headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def delta(after: dict[Any, float], before: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_prometheus_counters_move_by_the_requests_made() -> None:
    auth = {"Authorization": "Bearer key"}
    with LiveServer(make_app(bge_m3_like(), api_key="key")) as server:
        url = server.url
        before = scrape(url, auth)
        tokens = 0
        for body in ({"input": ["a b c", "d"]}, {"input": "e f"}):
            r = httpx.post(f"{url}/v1/embeddings", json=body, headers=auth)
            assert r.status_code == 200
            tokens += r.json()["usage"]["total_tokens"]
        assert (
            httpx.post(f"{url}/v1/embeddings", json={"input": ""}, headers=auth).status_code == 400
        )
        assert httpx.post(f"{url}/embeddings", json={"input": "x"}).status_code == 401
        assert httpx.get(f"{url}/nowhere").status_code == 404
        after = scrape(url, auth)

    route = {"route": "/v1/embeddings", "dialect": "openai"}
    assert delta(after, before, "bge_m3_requests_total", **route, status="200") == 2
    assert delta(after, before, "bge_m3_requests_total", **route, status="400") == 1
    assert (
        delta(
            after,
            before,
            "bge_m3_requests_total",
            route="/embeddings",
            dialect="native",
            status="401",
        )
        == 1
    )
    assert (
        delta(
            after,
            before,
            "bge_m3_requests_total",
            route="unmatched",
            dialect="native",
            status="404",
        )
        == 1
    )
    assert (
        delta(after, before, "bge_m3_errors_total", dialect="native", code="missing_api_key") == 1
    )
    assert delta(after, before, "bge_m3_errors_total", dialect="openai", code="empty_input") == 1
    assert delta(after, before, "bge_m3_inputs_total", route="/v1/embeddings") == 3
    assert delta(after, before, "bge_m3_tokens_total", route="/v1/embeddings") == tokens
    assert delta(after, before, "bge_m3_request_duration_seconds_count", **route) == 3
    assert delta(after, before, "bge_m3_stage_duration_seconds_count", stage="infer") == 2
    assert after[("bge_m3_in_flight_requests", frozenset())] == 0


def test_metrics_need_the_key_unless_public() -> None:
    with LiveServer(make_app(bge_m3_like(), api_key="key")) as server:
        r = httpx.get(f"{server.url}/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with LiveServer(make_app(bge_m3_like(), api_key="key", metrics_public=True)) as server:
        assert httpx.get(f"{server.url}/metrics").status_code == 200
    with LiveServer(make_app(bge_m3_like(), metrics="off")) as server:
        r = httpx.get(f"{server.url}/metrics")
        assert r.status_code == 404 and r.json()["error"]["code"] == "metrics_off"
