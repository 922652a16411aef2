"""Concurrency: `python -m handler.main` (uvicorn) on 127.0.0.1 and N clients, each sending its
share of a bounded number of POST /v1/embeddings requests, one after another.

Everything is bounded: the server must answer /health within `start_timeout_s`, each level stops
issuing requests after `level_timeout_s`, each request times out, and the server is always stopped
(SIGTERM, then SIGKILL) whatever happens. Only loopback is ever addressed.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    INTERRUPTED,
    REPO_ROOT,
    STOP,
    Json,
    ms_since,
    peak_rss_mib,
    percentile,
    rss_mib,
    say,
    stop_process,
)

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Plan:
    levels: tuple[int, ...]
    requests_per_client: int
    min_requests: int
    start_timeout_s: float
    level_timeout_s: float
    request_timeout_s: float


def requests(plan: Plan) -> int:
    """Requests in the plan's largest level."""
    return max(max(plan.min_requests, c * plan.requests_per_client) for c in plan.levels)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None
) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was healthy")
        if STOP.is_set():
            raise RuntimeError(INTERRUPTED)
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            status, _ = _request(conn, "GET", "/health", None)
            conn.close()
            if status == 200:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server was not healthy after {timeout_s:.0f} s")


def run_level(port: int, clients: int, total: int, texts: Sequence[str], plan: Plan) -> Json:
    """`total` requests from `clients` clients, request i sending texts[i % len(texts)]: distinct
    texts, or the service computes identical inputs once per pass and the figure measures that."""
    bodies = [
        json.dumps({"input": [text], "model": "bge-m3", "encoding_format": "float"}).encode()
        for text in texts
    ]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    counter = iter(range(total))  # shared: each request is taken once, by whichever client
    deadline = time.monotonic() + plan.level_timeout_s

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=plan.request_timeout_s)
        try:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                t = time.perf_counter()
                try:
                    status, _ = _request(
                        conn, "POST", "/v1/embeddings", bodies[index % len(bodies)]
                    )
                    key = str(status)
                except (OSError, http.client.HTTPException) as exc:
                    key = type(exc).__name__
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, port, timeout=plan.request_timeout_s)
                elapsed = ms_since(t)
                with lock:
                    statuses[key] = statuses.get(key, 0) + 1
                    if key == "200":
                        latencies.append(elapsed)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=plan.level_timeout_s + plan.request_timeout_s + 5)
    wall = time.perf_counter() - start
    ok = len(latencies)
    return {
        "clients": clients,
        "requests": sum(statuses.values()),
        "planned": total,
        "ok": ok,
        "statuses": statuses,
        "seconds": round(wall, 3),
        "requests_per_s": round(ok / wall, 2) if wall > 0 else None,
        "p50_ms": round(percentile(latencies, 50), 2) if latencies else None,
        "p95_ms": round(percentile(latencies, 95), 2) if latencies else None,
        "stopped_by_deadline": time.monotonic() >= deadline,
    }


@contextmanager
def served(
    artifact: Path, log_file: Path, start_timeout_s: float
) -> Iterator[tuple[int, int, float]]:
    """`python -m handler.main` serving `artifact` on a free loopback port, its output in
    `log_file`: yields (pid, port, seconds to healthy) and always stops the server."""
    port = free_port()
    env = {
        **os.environ,
        "MODEL_PATH": str(artifact),
        "PORT": str(port),
        "HOST": HOST,
        "MODEL_VERIFY": os.environ.get("MODEL_VERIFY", "size"),
        "PYTHONUNBUFFERED": "1",
    }
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "handler.main"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            yield proc.pid, port, wait_healthy(proc, port, start_timeout_s)
        finally:
            stop_process(proc)


def measure(artifact: Path, texts: Sequence[str], tokens: int, plan: Plan, log_file: Path) -> Json:
    """Start the server on a free loopback port, run every level, always stop the server."""
    result: Json = {"tokens_per_request": tokens, "levels": {}}
    try:
        with served(artifact, log_file, plan.start_timeout_s) as (pid, port, start_s):
            result["port"] = port
            result["start_s"] = round(start_s, 3)
            result["rss_after_load_mib"] = round(rss_mib(pid), 1)
            say("concurrency", f"server healthy on {HOST}:{port} after {start_s:.1f}s")
            warm = run_level(port, 1, 1, texts[-1:], plan)  # one request: the route's first call
            if warm["ok"] != 1:
                raise RuntimeError(f"the first request failed: {warm['statuses']}")
            for clients in plan.levels:
                if STOP.is_set():
                    raise RuntimeError(INTERRUPTED)
                total = max(plan.min_requests, clients * plan.requests_per_client)  # requests()
                level = run_level(port, clients, total, texts, plan)
                result["levels"][str(clients)] = level
                say(
                    "concurrency",
                    f"{clients:>2} clients: {level['ok']}/{level['planned']} ok, "
                    f"{level['requests_per_s']} req/s, p95 {level['p95_ms']} ms",
                )
            result["peak_rss_mib"] = round(peak_rss_mib(pid), 1)
    except Exception as exc:
        result["error"] = f"{exc}; server log: {log_file}"
    if "error" in result:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-8:]
        result["server_log_tail"] = tail
        say("concurrency", f"FAILED: {result['error']}")
    return result
