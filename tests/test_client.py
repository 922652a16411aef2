"""The SigV4 client (handler/client.py) against a local HTTP server that checks what it receives.

No AWS call is made: credentials are static fakes from the environment, the server is on 127.0.0.1,
and the server recomputes the SigV4 signature itself (from the AWS spec, not with botocore) from the
request exactly as it arrived.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from handler import client

ACCESS_KEY = "AKIDEXAMPLE0000000000"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLE//session+token="

AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 "
    r"Credential=(?P<key>[A-Z0-9]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/(?P<service>[a-z-]+)"
    r"/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<sig>[0-9a-f]{64})$"
)


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    requests: list[Received] = field(default_factory=list)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def expected_signature(req: Received, host: str, secret: str) -> str:
    """SigV4 recomputed from the request as received (docs.aws.amazon.com, "Create a signed AWS
    API request"): canonical request -> string to sign -> HMAC chain."""
    match = AUTH_RE.match(req.headers["authorization"])
    assert match, req.headers["authorization"]
    signed = match["signed"].split(";")
    split = urllib.parse.urlsplit(req.path)
    query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
        for k, v in sorted(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
    )
    headers = {**req.headers, "host": host}
    canonical_headers = "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in signed)
    canonical = "\n".join(
        [
            req.method,
            urllib.parse.quote(split.path or "/", safe="/-_.~"),
            query,
            canonical_headers,
            match["signed"],
            hashlib.sha256(req.body).hexdigest(),
        ]
    )
    scope = f"{match['date']}/{match['region']}/{match['service']}/aws4_request"
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            req.headers["x-amz-date"],
            scope,
            hashlib.sha256(canonical.encode()).hexdigest(),
        ]
    )
    key = _hmac(("AWS4" + secret).encode(), match["date"])
    for part in (match["region"], match["service"], "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def server() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            recorder.requests.append(
                Received(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
            )
            status = 404 if self.path.startswith("/missing") else 200
            reply = json.dumps({"object": "list", "path": self.path}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", recorder
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def fake_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Static credentials from the environment only: no ~/.aws, no instance metadata."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_SECURITY_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    for name in (
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _session() -> Any:
    import botocore.session

    return botocore.session.Session()  # reads the (patched) environment now


def test_post_is_signed_for_lambda_in_the_given_region(
    server: tuple[str, Recorder], fake_credentials: None
) -> None:
    url, recorder = server
    body = {"model": "bge-m3", "input": ["hello", "wörld"], "encoding_format": "float"}

    response = client.invoke(url, "/v1/embeddings", body, region="eu-west-1", session=_session())

    assert response.ok and response.json()["path"] == "/v1/embeddings"
    (req,) = recorder.requests
    assert req.method == "POST"
    assert json.loads(req.body) == body
    match = AUTH_RE.match(req.headers["authorization"])
    assert match, req.headers["authorization"]
    assert match["key"] == ACCESS_KEY
    assert match["region"] == "eu-west-1"
    assert match["service"] == "lambda"
    assert re.fullmatch(r"\d{8}T\d{6}Z", req.headers["x-amz-date"])
    assert req.headers["x-amz-date"].startswith(match["date"])
    assert req.headers["x-amz-content-sha256"] == hashlib.sha256(req.body).hexdigest()
    assert "x-amz-security-token" not in req.headers  # long-term keys carry no token
    signed = match["signed"].split(";")
    assert {"host", "x-amz-date", "x-amz-content-sha256", "content-type"} <= set(signed)
    assert match["sig"] == expected_signature(req, url.split("//")[1], SECRET_KEY)


def test_temporary_credentials_send_and_sign_the_session_token(
    server: tuple[str, Recorder], fake_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv("AWS_REGION", "ap-southeast-2")  # as Lambda and CloudShell set it
    url, recorder = server

    response = client.invoke(url, "/health", session=_session())

    assert response.ok
    (req,) = recorder.requests
    assert req.method == "GET" and req.body == b""
    assert req.headers["x-amz-security-token"] == SESSION_TOKEN
    match = AUTH_RE.match(req.headers["authorization"])
    assert match and match["region"] == "ap-southeast-2" and match["service"] == "lambda"
    assert "x-amz-security-token" in match["signed"].split(";")
    assert req.headers["x-amz-content-sha256"] == hashlib.sha256(b"").hexdigest()
    assert match["sig"] == expected_signature(req, url.split("//")[1], SECRET_KEY)


def test_a_tampered_body_no_longer_matches_the_signature(
    server: tuple[str, Recorder], fake_credentials: None
) -> None:
    # GIVEN a correctly signed request, WHEN the body differs from the one signed,
    # THEN the recomputed signature differs: the check above is not vacuous.
    url, recorder = server
    client.invoke(url, "/score", {"queries": ["q"]}, region="us-east-1", session=_session())
    (req,) = recorder.requests
    sig = AUTH_RE.match(req.headers["authorization"])
    assert sig is not None
    tampered = Received(req.method, req.path, req.headers, req.body + b" ")
    assert sig["sig"] != expected_signature(tampered, url.split("//")[1], SECRET_KEY)


def test_non_2xx_is_returned_not_raised_until_asked(
    server: tuple[str, Recorder], fake_credentials: None
) -> None:
    url, _ = server
    response = client.invoke(url, "/missing", region="us-east-1", session=_session())
    assert response.status == 404 and not response.ok
    with pytest.raises(client.ResponseError):
        response.raise_for_status()


def test_cli_signs_and_prints_the_body(
    server: tuple[str, Recorder],
    fake_credentials: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, recorder = server
    code = client.main([url, "--region", "us-west-2", "--text", "hello", "--text", "world"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["path"] == "/v1/embeddings"
    (req,) = recorder.requests
    assert json.loads(req.body)["input"] == ["hello", "world"]
    match = AUTH_RE.match(req.headers["authorization"])
    assert match and match["region"] == "us-west-2" and match["service"] == "lambda"


def test_cli_without_region_fails_before_sending(
    server: tuple[str, Recorder], fake_credentials: None, capsys: pytest.CaptureFixture[str]
) -> None:
    url, recorder = server
    assert client.main([url, "--text", "hello"]) == 2
    assert "region" in capsys.readouterr().err
    assert recorder.requests == []


def test_missing_credentials_fail_before_sending(
    server: tuple[str, Recorder], fake_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    url, recorder = server
    with pytest.raises(client.ClientError, match="credentials"):
        client.invoke(url, "/health", region="us-east-1", session=_session())
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("url", "region", "service"),
    [
        ("https://abcdefghij1234567890.lambda-url.us-east-1.on.aws/", "us-east-1", "lambda"),
        ("https://x7k.lambda-url.ap-northeast-3.on.aws", "ap-northeast-3", "lambda"),
        ("https://a1b2.execute-api.eu-central-1.amazonaws.com/v1", "eu-central-1", "execute-api"),
        ("https://a1b2c3.execute-api.cn-north-1.amazonaws.com.cn", "cn-north-1", "execute-api"),
        ("https://embed.example.com", None, None),
        ("http://127.0.0.1:8000", None, None),
    ],
)
def test_region_and_service_from_the_host(
    url: str, region: str | None, service: str | None
) -> None:
    assert client.parse_host(url) == (region, service)


def test_join_url_keeps_a_stage_prefix() -> None:
    assert client.join_url("https://h.example/prod/", "/v1/embeddings") == (
        "https://h.example/prod/v1/embeddings"
    )
    assert client.join_url("https://h.example", "health") == "https://h.example/health"
    with pytest.raises(client.ClientError):
        client.join_url("h.example", "/health")


def test_text_bodies_follow_the_dialect_of_the_path() -> None:
    assert client.body_for_texts("/v1/embeddings", ["a"])["input"] == ["a"]
    v2 = client.body_for_texts("/api/data/embedding/version/2", ["a", "b"])
    assert v2["data"] == [{"data_type": "text", "text": "a"}, {"data_type": "text", "text": "b"}]
    assert client.body_for_texts("/embeddings", ["a"]) == {"input": ["a"]}
    with pytest.raises(client.ClientError):
        client.body_for_texts("/score", ["a"])
