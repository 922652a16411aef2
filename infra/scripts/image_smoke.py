"""Smoke checks for a built image, standard library only (the runtime image has nothing else).

    python3 image_smoke.py lambda EVENTS_DIR
        Inside the image: import handler.lambda_function and call `handler(event, context)` with
        every captured API Gateway / Function URL / ALB event in EVENTS_DIR, its method, path and
        body replaced by ours (the rest kept as captured): GET /health, then POST /v1/embeddings
        (base64-encoded where the capture was). The negative capture (isBase64Encoded true, body
        not base64) must give a 4xx, not an exception.
    python3 image_smoke.py http BASE_URL [--device cpu|cuda] [--wait SECONDS]
        Against a running server: wait for GET /health, then one request per dialect (OpenAI,
        Volcengine v2, native /embeddings and /score), each checked for its shape.

Exit status 0 when every check passed; each check prints one line.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEXTS = ["BGE-M3 serverless smoke test", "向量检索 (multilingual)"]
NEGATIVE_MARKER = "not_base64"


class CheckFailed(AssertionError):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def is_vector(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(x, float | int) for x in value)
    )


# ---- Lambda events ------------------------------------------------------------------------------


class FakeContext:
    """The attributes Mangum and our request logging read from a Lambda context."""

    function_name = "bge-m3-image-smoke"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bge-m3-image-smoke"
    memory_limit_in_mb = 4096
    log_group_name = "/aws/lambda/bge-m3-image-smoke"
    log_stream_name = "smoke"

    def __init__(self, request_id: str) -> None:
        self.aws_request_id = request_id

    def get_remaining_time_in_millis(self) -> int:
        return 120_000


def _drop(headers: dict[str, Any], *names: str) -> None:
    for key in list(headers):
        if key.lower() in names:
            del headers[key]


def rewrite(
    event: dict[str, Any], method: str, path: str, body: bytes | None, *, base64_body: bool
) -> dict[str, Any]:
    """The captured event with our method, path and body; everything else as captured."""
    out: dict[str, Any] = json.loads(json.dumps(event))
    if body is None:
        out["body"] = None
        out["isBase64Encoded"] = False
    elif base64_body:
        out["body"] = base64.b64encode(body).decode("ascii")
        out["isBase64Encoded"] = True
    else:
        out["body"] = body.decode("utf-8")
        out["isBase64Encoded"] = False
    for key in ("headers", "multiValueHeaders"):
        headers = out.get(key)
        if isinstance(headers, dict):
            _drop(headers, "content-type", "content-length", "transfer-encoding", "authorization")
            if body is not None:
                value = "application/json"
                headers["content-type"] = [value] if key == "multiValueHeaders" else value
    if out.get("version") == "2.0":  # HTTP API payload 2.0 and Function URLs
        out["rawPath"] = path
        out["requestContext"]["http"]["method"] = method
        out["requestContext"]["http"]["path"] = path
    else:  # REST API (v1), HTTP API payload 1.0, ALB
        out["httpMethod"] = method
        out["path"] = path
        context = out.get("requestContext")
        if isinstance(context, dict) and "httpMethod" in context:
            context["httpMethod"] = method
            context["path"] = path
    return out


def response_json(response: dict[str, Any]) -> Any:
    body = response.get("body") or ""
    raw = base64.b64decode(body) if response.get("isBase64Encoded") else body.encode("utf-8")
    return json.loads(raw)


def check_lambda(events_dir: Path) -> None:
    start = time.perf_counter()
    from handler import lambda_function

    # Called the way the Lambda runtime calls it: handler(event, context) -> response dict.
    handler: Callable[[dict[str, Any], Any], dict[str, Any]] = lambda_function.handler

    print(f"ok   import handler.lambda_function (init) in {time.perf_counter() - start:.2f} s")
    files = sorted(events_dir.glob("*.json"))
    expect(bool(files), f"no events in {events_dir}")
    embed = json.dumps({"input": TEXTS, "encoding_format": "float"}).encode("utf-8")
    calls = 0
    for path in files:
        event = json.loads(path.read_text(encoding="utf-8-sig"))
        captured_b64 = bool(event.get("isBase64Encoded"))
        if NEGATIVE_MARKER in path.name:
            # As captured (claims base64, is not), only routed to us: a 4xx, not a crash.
            bad = rewrite(event, "POST", "/v1/embeddings", None, base64_body=False)
            bad["body"], bad["isBase64Encoded"] = event.get("body"), True
            response = handler(bad, FakeContext(f"neg-{path.stem}"))
            status = response["statusCode"]
            expect(400 <= status < 500, f"{path.name}: bad base64 gave {status}, want 4xx")
            print(f"ok   {path.name}: invalid base64 body -> {status}")
            calls += 1
            continue
        health = handler(
            rewrite(event, "GET", "/health", None, base64_body=False),
            FakeContext(f"health-{path.stem}"),
        )
        expect(health["statusCode"] == 200, f"{path.name}: GET /health -> {health}")
        expect(response_json(health)["status"] == "healthy", f"{path.name}: {health}")
        response = handler(
            rewrite(event, "POST", "/v1/embeddings", embed, base64_body=captured_b64),
            FakeContext(f"embed-{path.stem}"),
        )
        expect(response["statusCode"] == 200, f"{path.name}: POST -> {response}")
        data = response_json(response)["data"]
        expect(len(data) == len(TEXTS), f"{path.name}: {len(data)} embeddings")
        expect(all(is_vector(item["embedding"]) for item in data), f"{path.name}: not vectors")
        dims = len(data[0]["embedding"])
        how = "base64 body" if captured_b64 else "text body"
        print(f"ok   {path.name}: GET /health 200, POST /v1/embeddings 200 ({how}, dims {dims})")
        calls += 2
    print(f"ok   {calls} Lambda invocations from {len(files)} captured events")


# ---- HTTP dialects ------------------------------------------------------------------------------


def http(method: str, url: str, body: Any | None = None, timeout: float = 60.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def wait_healthy(base: str, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = http("GET", f"{base}/health", timeout=5)
            if status == 200:
                return dict(body)
            last = (status, body)
        except (OSError, ValueError) as error:  # not listening yet
            last = error
        time.sleep(0.5)
    raise CheckFailed(f"{base}/health not healthy after {seconds:.0f} s: {last}")


def check_openai(base: str) -> str:
    status, body = http(
        "POST", f"{base}/v1/embeddings", {"input": TEXTS, "encoding_format": "float"}
    )
    expect(status == 200, f"/v1/embeddings -> {status} {body}")
    expect(body["object"] == "list" and len(body["data"]) == len(TEXTS), str(body)[:300])
    expect(all(is_vector(d["embedding"]) for d in body["data"]), "not vectors")
    return f"{len(body['data'])} x {len(body['data'][0]['embedding'])}, model {body['model']}"


def check_v2(base: str) -> str:
    request: dict[str, Any] = {
        "model": {"model_name": "bge-m3", "params": {"return_dense": True, "return_sparse": True}},
        "data": [{"data_type": "text", "text": t} for t in TEXTS],
    }
    # The served id may differ from "bge-m3" (a fixture build); fall back to the default model.
    status, body = http("POST", f"{base}/api/data/embedding/version/2", request)
    if status != 200:
        _, models = http("GET", f"{base}/v1/models")
        request["model"]["model_name"] = models["data"][0]["id"]
        status, body = http("POST", f"{base}/api/data/embedding/version/2", request)
    expect(status == 200 and body.get("code") == 0, f"v2 -> {status} {body}")
    dense = body["data"]["sentence_dense_embedding"]
    sparse = body["data"].get("sentence_sparse_embedding")
    expect(len(dense) == len(TEXTS) and all(is_vector(v) for v in dense), "v2 dense")
    expect(sparse is not None and len(sparse) == len(TEXTS), "v2 sparse")
    return f"code 0, dense {len(dense)} x {len(dense[0])}, sparse {len(sparse)} maps"


def check_native(base: str) -> str:
    request = {"input": TEXTS, "input_type": {"dense": True, "sparse": True, "colbert": True}}
    status, body = http("POST", f"{base}/embeddings", request)
    expect(status == 200, f"/embeddings -> {status} {body}")
    expect(all(is_vector(v) for v in body["dense_vecs"]), "native dense")
    expect(len(body["sparse_vecs"]) == len(TEXTS), "native sparse")
    expect(len(body["colbert_vecs"]) == len(TEXTS), "native colbert")
    return f"dense+sparse+colbert for {len(TEXTS)} inputs"


def check_score(base: str) -> str:
    request = {"sentences_1": TEXTS[:1], "sentences_2": TEXTS[1:]}
    status, body = http("POST", f"{base}/score", request)
    expect(status == 200, f"/score -> {status} {body}")
    expect(len(body["dense"]) == 1 and isinstance(body["dense"][0], float), str(body)[:300])
    return f"dense {body['dense'][0]:.4f}, colbert+sparse+dense {body['colbert+sparse+dense']}"


def check_http(base: str, device: str | None, wait: float) -> None:
    base = base.rstrip("/")
    start = time.perf_counter()
    health = wait_healthy(base, wait)
    took = time.perf_counter() - start
    print(f"ok   GET /health healthy after {took:.1f} s: device {health['device']}")
    if device is not None:
        expect(health["device"] == device, f"device {health['device']}, expected {device}")
    checks: list[tuple[str, Callable[[str], str]]] = [
        ("openai POST /v1/embeddings", check_openai),
        ("v2     POST /api/data/embedding/version/2", check_v2),
        ("native POST /embeddings", check_native),
        ("native POST /score", check_score),
    ]
    for name, check in checks:
        print(f"ok   {name}: {check(base)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="mode", required=True)
    lam = sub.add_parser("lambda")
    lam.add_argument("events_dir", type=Path)
    web = sub.add_parser("http")
    web.add_argument("base_url")
    web.add_argument("--device", choices=("cpu", "cuda"))
    web.add_argument("--wait", type=float, default=120.0)
    args = parser.parse_args(argv)
    try:
        if args.mode == "lambda":
            check_lambda(args.events_dir)
        else:
            check_http(args.base_url, args.device, args.wait)
    except (CheckFailed, KeyError, TypeError, ValueError) as error:
        print(f"FAIL {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
