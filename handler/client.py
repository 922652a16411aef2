"""Call an IAM-protected deployment: a Lambda Function URL (`AuthType: AWS_IAM`) or an HTTP API with
an IAM authorizer. Requests are signed with SigV4 by botocore, with credentials from the default
chain (environment, `~/.aws`, SSO, container or instance role) and no other AWS call.

    python -m handler.client https://<id>.lambda-url.<region>.on.aws --text "hello" --text "world"
    python -m handler.client URL --path /health
    python -m handler.client URL --path /api/data/embedding/version/2 --text "hello"
    python -m handler.client URL --path /score --data '{"queries": ["q"], "passages": ["p"]}'

or from Python:

    from handler.client import invoke
    response = invoke(url, "/v1/embeddings", {"model": "bge-m3", "input": ["hello"]})
    response.raise_for_status()
    vector = response.json()["data"][0]["embedding"]

The signing service is `lambda` for Function URLs (`*.lambda-url.<region>.on.aws`) and `execute-api`
for API Gateway (`*.execute-api.<region>.amazonaws.com`); the region comes from the host name, else
from the `region` argument or the AWS config (`AWS_REGION`, `~/.aws/config`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# <url-id>.lambda-url.<region>.on.aws and <api-id>.execute-api.<region>.amazonaws.com[.cn]
_HOST_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^[^.]+\.lambda-url\.(?P<region>[a-z0-9-]+)\.on\.aws$"), "lambda"),
    (
        re.compile(r"^[^.]+\.execute-api\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?$"),
        "execute-api",
    ),
)

DEFAULT_SERVICE = "lambda"
DEFAULT_MODEL = "bge-m3"


class ClientError(Exception):
    """Missing credentials or region, or a bad URL: nothing was sent."""


class ResponseError(Exception):
    """The deployment answered with a status other than 2xx (`Response.raise_for_status`)."""

    def __init__(self, response: Response):
        super().__init__(f"HTTP {response.status} from {response.url}: {response.text[:500]}")
        self.response = response


@dataclass(frozen=True)
class Response:
    """What came back: the status, the headers (names lower-cased) and the raw body."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str = field(default="")

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def raise_for_status(self) -> None:
        if not self.ok:
            raise ResponseError(self)


def parse_host(url: str) -> tuple[str | None, str | None]:
    """(region, service) read from an AWS-managed host name; (None, None) for any other host."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    for pattern, service in _HOST_PATTERNS:
        match = pattern.match(host)
        if match:
            return match.group("region"), service
    return None, None


def join_url(base: str, path: str) -> str:
    """`base` with `path` appended; a path in `base` is kept as a prefix (an API stage, say)."""
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError(f"not an http(s) URL: {base!r}")
    if not path or path == "/":
        joined = parts.path or "/"
    else:
        joined = parts.path.rstrip("/") + "/" + path.lstrip("/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, joined, parts.query, ""))


def _session(session: Any | None) -> Any:
    if session is not None:
        return session
    import botocore.session

    return botocore.session.get_session()


def sign(
    method: str,
    url: str,
    body: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    region: str | None = None,
    service: str | None = None,
    session: Any | None = None,
) -> dict[str, str]:
    """The headers to send for a SigV4-signed request (the given ones plus Authorization,
    X-Amz-Date, X-Amz-Content-Sha256 and, for temporary credentials, X-Amz-Security-Token).

    `session` is a botocore or boto3 session; without one, botocore's default chain is used.
    """
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    url_region, url_service = parse_host(url)
    boto_session = _session(session)
    region = region or url_region or getattr(boto_session, "region_name", None)
    if not region and hasattr(boto_session, "get_config_variable"):
        region = boto_session.get_config_variable("region")  # AWS_DEFAULT_REGION, ~/.aws/config
    # botocore reads AWS_DEFAULT_REGION only; Lambda, CloudShell and the AWS CLI v2 set AWS_REGION.
    region = region or os.environ.get("AWS_REGION")
    if not region:
        raise ClientError(
            "no region: the URL does not name one; pass --region (or region=) or set AWS_REGION"
        )
    credentials = boto_session.get_credentials()
    if credentials is None:
        raise ClientError(
            "no AWS credentials found (environment, ~/.aws, SSO, container or instance role)"
        )
    request = AWSRequest(
        method=method.upper(),
        url=url,
        data=body,
        headers={
            **(headers or {}),
            # Signed as well; Function URLs behind CloudFront need it for bodies, and it lets the
            # receiver check the body it got is the body that was signed.
            "X-Amz-Content-Sha256": hashlib.sha256(body).hexdigest(),
        },
    )
    SigV4Auth(
        credentials.get_frozen_credentials(), service or url_service or DEFAULT_SERVICE, region
    ).add_auth(request)
    return {str(k): str(v) for k, v in request.headers.items()}


def invoke(
    url: str,
    path: str = "/v1/embeddings",
    json_body: Any | None = None,
    *,
    method: str | None = None,
    region: str | None = None,
    service: str | None = None,
    session: Any | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Response:
    """Send one signed request to `url` + `path` and return the response (any status).

    `json_body` is sent as JSON with POST; without it the request is a GET (override with
    `method`). `headers` are sent and signed too, e.g. an API key header for a deployment that
    checks one besides IAM (the Authorization header itself carries the signature).
    """
    full_url = join_url(url, path)
    body = b"" if json_body is None else json.dumps(json_body).encode("utf-8")
    verb = (method or ("GET" if json_body is None else "POST")).upper()
    base_headers = {"Accept": "application/json", **(headers or {})}
    if json_body is not None:
        base_headers["Content-Type"] = "application/json"
    signed = sign(
        verb, full_url, body, base_headers, region=region, service=service, session=session
    )
    request = urllib.request.Request(
        full_url, data=body if body else None, headers=signed, method=verb
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return Response(
                status=reply.status,
                headers={k.lower(): v for k, v in reply.headers.items()},
                body=reply.read(),
                url=full_url,
            )
    except urllib.error.HTTPError as error:
        return Response(
            status=error.code,
            headers={k.lower(): v for k, v in (error.headers or {}).items()},
            body=error.read(),
            url=full_url,
        )


def body_for_texts(path: str, texts: Sequence[str], model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """A request body for `texts` in the dialect that `path` speaks."""
    route = "/" + path.strip("/")
    if route.endswith("/api/data/embedding/version/2"):
        return {
            "model": {"model_name": model, "params": {"return_dense": True}},
            "data": [{"data_type": "text", "text": t} for t in texts],
        }
    if route.endswith("/v1/embeddings"):
        return {"model": model, "input": list(texts), "encoding_format": "float"}
    if route.endswith("/embeddings"):
        return {"input": list(texts)}
    raise ClientError(f"--text does not know the request shape of {path}; use --data")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m handler.client",
        description="Send one SigV4-signed request to an IAM-protected Function URL or HTTP API.",
    )
    parser.add_argument("url", help="the Function URL (or API endpoint) without the route")
    parser.add_argument("--path", default=None, help="route (default /v1/embeddings, /health)")
    body = parser.add_mutually_exclusive_group()
    body.add_argument("--data", help="JSON request body (use @FILE to read it from a file)")
    body.add_argument(
        "--text", action="append", help="text to embed; repeat for a batch (builds the body)"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name for --text bodies")
    parser.add_argument("--method", help="HTTP method (default POST with a body, else GET)")
    parser.add_argument("--region", help="AWS region (default: from the URL, else AWS config)")
    parser.add_argument("--service", help="signing service (default: from the URL, else lambda)")
    parser.add_argument("--profile", help="AWS profile from ~/.aws/config")
    parser.add_argument(
        "--header", action="append", default=[], metavar="NAME:VALUE", help="extra header"
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    json_body: Any | None = None
    path = args.path
    if args.data is not None:
        raw = args.data
        if raw.startswith("@"):
            with open(raw[1:], encoding="utf-8") as fh:
                raw = fh.read()
        json_body = json.loads(raw)
        path = path or "/v1/embeddings"
    elif args.text:
        path = path or "/v1/embeddings"
        json_body = body_for_texts(path, args.text, args.model)
    else:
        path = path or "/health"
    extra: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"--header wants NAME:VALUE, got {item!r}")
        extra[name.strip()] = value.strip()
    session = None
    if args.profile:
        import botocore.session

        session = botocore.session.Session(profile=args.profile)
    try:
        response = invoke(
            args.url,
            path,
            json_body,
            method=args.method,
            region=args.region,
            service=args.service,
            session=session,
            headers=extra,
            timeout=args.timeout,
        )
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"HTTP {response.status} {response.url}", file=sys.stderr)
    sys.stdout.write(response.text)
    if not response.text.endswith("\n"):
        sys.stdout.write("\n")
    return 0 if response.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
