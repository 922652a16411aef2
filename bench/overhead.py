"""What the path around the model costs: one query, the same request both ways.

- Lambda: the handler (`handler.lambda_function.handler`, a Function URL event, Mangum, the app)
  against the engine called directly with the options the route passes, alternately in one
  process, so that both see the same machine noise;
- uvicorn: a real `python -m handler.main` on 127.0.0.1, one client on one keep-alive connection,
  against the same direct engine calls in this process, made after the requests rather than
  between them: the server and this process each run onnxruntime, whose intra-op threads spin
  for a while after a pass, and alternating the two on the same cores made each one's pass run
  against the other's spinning threads (handler and engine p50 both about doubled, 23 -> 45 ms
  on the full-size model; docs/overhead.md).

Two figures each: handler p50 minus engine p50, and per response its wall time minus the stages
its own `x-*-time` headers report (tokenize, queue, infer, post), whose median is steadier than a
difference of medians. For Lambda also the calling thread's own CPU time per handler call (the
adapter, the event loop, the middleware and FastAPI; the route itself runs on a model thread).

    python -m bench.overhead MODEL_DIR [--reps 300] [--no-uvicorn] [--back-to-back] --out FILE
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench.common import LAMBDA_ENV, Json, ms_since, percentile
from bench.worker import LambdaContext, lambda_event

# The engine's own stages; x-total-time is the middleware's whole request and is not one.
STAGE_HEADER = re.compile(r"^x-(?!total-)[a-z0-9-]+-time$")
SERVING = re.compile(r"serving on http://([^\s:/]+):(\d+)")


def request_body(text: str) -> str:
    """The 9-token query as the OpenAI dialect gets it: dense vectors only, as floats (the body
    of the same Lambda event the handler is timed with)."""
    return str(lambda_event([text])["body"])


def stages_ms(headers: Mapping[str, str]) -> float:
    return sum(float(v) for k, v in headers.items() if STAGE_HEADER.match(k.lower()))


def direct_call(engine: Any, text: str, settings: Any) -> Callable[[], object]:
    """The engine call the OpenAI route makes for this request (dense only, the default
    truncation and limits), without the service, the app or the adapter around it."""
    max_length = engine.info.max_length
    if settings.max_input_tokens is not None:
        max_length = min(max_length, settings.max_input_tokens)

    def call() -> object:
        return engine.encode(
            [text],
            dense=True,
            sparse=False,
            colbert=False,
            max_length=max_length,
            truncate=True,
            max_tokens=settings.max_tokens_per_request,
        )

    return call


def summary(handler: list[float], engine: list[float], residual: list[float]) -> Json:
    """The two overhead figures, with their spread (quartiles of the per-response residual)."""
    return {
        "n": len(handler),
        "handler_p50_ms": round(percentile(handler, 50), 3),
        "engine_p50_ms": round(percentile(engine, 50), 3),
        "p50_difference_ms": round(percentile(handler, 50) - percentile(engine, 50), 3),
        "wall_minus_stages_p50_ms": round(percentile(residual, 50), 3),
        "wall_minus_stages_p25_ms": round(percentile(residual, 25), 3),
        "wall_minus_stages_p75_ms": round(percentile(residual, 75), 3),
        "wall_minus_stages_p95_ms": round(percentile(residual, 95), 3),
    }


def lambda_overhead(
    handler: Any, engine: Any, settings: Any, text: str, reps: int, *, alternate: bool = True
) -> Json:
    """Handler and engine, alternately, `reps` times each (after a warm-up of both). With
    `alternate` off, the handler calls run back to back and the engine calls after them: each
    handler call then follows its predecessor's forward pass only, not an extra one."""
    direct = direct_call(engine, text, settings)
    context = LambdaContext()
    event = lambda_event([text])
    direct()
    for _ in range(3):
        handler(dict(event), context)
    handler_ms, engine_ms, residual, main_cpu = [], [], [], []
    for _ in range(reps):
        cpu = time.thread_time()
        t = time.perf_counter()
        response = handler(dict(event), context)
        wall = ms_since(t)
        main_cpu.append((time.thread_time() - cpu) * 1000.0)
        if response.get("statusCode") != 200:
            raise RuntimeError(f"the Lambda handler answered {response.get('statusCode')}")
        handler_ms.append(wall)
        residual.append(wall - stages_ms(response.get("headers") or {}))
        if alternate:
            t = time.perf_counter()
            direct()
            engine_ms.append(ms_since(t))
    while len(engine_ms) < reps:
        t = time.perf_counter()
        direct()
        engine_ms.append(ms_since(t))
    return {
        "path": "Lambda handler (Function URL event) -> POST /v1/embeddings, dense only",
        "alternating": alternate,
        **summary(handler_ms, engine_ms, residual),
        # The CPU time of the calling thread alone: Mangum, the event loop, the middleware and
        # FastAPI's routing, not the model thread. Less disturbed by the machine than wall time.
        "main_thread_cpu_p50_ms": round(percentile(main_cpu, 50), 3),
    }


def start_server(env: Mapping[str, str]) -> tuple[subprocess.Popen[str], str, int]:
    """`python -m handler.main` on a free loopback port; returns once it logged its address."""
    # A uvicorn host is not Lambda: without the Lambda variables the service takes its own
    # platform defaults (micro-batching on, Prometheus metrics).
    plain = {k: v for k, v in env.items() if not k.startswith("AWS_LAMBDA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "handler.main"],
        env={**plain, "HOST": "127.0.0.1", "PORT": "0", "LOG_LEVEL": "INFO"},
        stdout=subprocess.DEVNULL,  # the per-request JSON lines
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        found = SERVING.search(line)
        if found:
            # Drain the rest of stderr in the background so the server never blocks on it.
            import threading

            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, found.group(1), int(found.group(2))
    proc.wait()
    raise RuntimeError(f"handler.main exited {proc.returncode} before serving")


def connect(conn: http.client.HTTPConnection, timeout_s: float = 30.0) -> None:
    """The address is logged once bound; uvicorn listens a moment later."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.connect()
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def uvicorn_overhead(
    engine: Any, settings: Any, text: str, reps: int, env: Mapping[str, str]
) -> Json:
    """One client, one keep-alive connection; the direct engine calls here after the requests
    (not between them: two processes' onnxruntime threads would contend, see the module's
    docstring)."""
    direct = direct_call(engine, text, settings)
    proc, host, port = start_server(env)
    try:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        body = request_body(text).encode()
        head = {"content-type": "application/json"}

        def post() -> tuple[float, dict[str, str]]:
            t = time.perf_counter()
            conn.request("POST", "/v1/embeddings", body=body, headers=head)
            response = conn.getresponse()
            response.read()
            wall = ms_since(t)
            if response.status != 200:
                raise RuntimeError(f"uvicorn answered {response.status}")
            return wall, {k.lower(): v for k, v in response.getheaders()}

        direct()
        connect(conn)
        for _ in range(3):
            post()
        handler_ms, engine_ms, residual = [], [], []
        for _ in range(reps):
            wall, headers = post()
            handler_ms.append(wall)
            residual.append(wall - stages_ms(headers))
        conn.close()
        for _ in range(reps):
            t = time.perf_counter()
            direct()
            engine_ms.append(ms_since(t))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "path": "python -m handler.main (uvicorn, 127.0.0.1), one keep-alive client -> "
        "POST /v1/embeddings, dense only, back to back; the engine here, in the client's "
        "process, after them",
        **summary(handler_ms, engine_ms, residual),
    }


def lambda_environment(model: Path) -> None:
    """This process's environment as the bench's worker runs the Lambda handler: the model, what
    Lambda sets (bench.common.LAMBDA_ENV) and the image's MODEL_VERIFY. Before the entry point
    is imported: it reads the settings then."""
    os.environ["MODEL_PATH"] = str(model)
    for name, value in LAMBDA_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MODEL_VERIFY", "size")


def entry_point() -> tuple[Any, Any, Any]:
    """The Lambda entry point imported in this process: (its handler, the engine it loaded, the
    service's settings)."""
    import importlib

    from bench.worker import find_engines

    module = importlib.import_module("handler.lambda_function")
    from handler.main import settings

    engines = find_engines()
    if not engines:
        raise RuntimeError("no handler.engine.Engine loaded")
    return module.handler, engines[0], settings


def measure(text: str, reps: int, *, uvicorn: bool, alternate: bool = True) -> Json:
    """Both figures, in this process (its environment names the model: MODEL_PATH)."""
    handler, engine, settings = entry_point()
    out: Json = {
        "lambda": lambda_overhead(handler, engine, settings, text, reps, alternate=alternate),
    }
    if uvicorn:
        out["uvicorn"] = uvicorn_overhead(engine, settings, text, reps, dict(os.environ))
    return out


def nine_tokens(model: Path) -> str:
    from bench.texts import TokenTexts

    return TokenTexts(model / "tokenizer.json").make(9, seed=9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument("model", type=Path, help="a directory made by python -m model_build")
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--no-uvicorn", action="store_true")
    parser.add_argument(
        "--back-to-back",
        action="store_true",
        help="Lambda: the handler calls one after another, the engine calls after them",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the JSON figures (stdout has the request logs)"
    )
    args = parser.parse_args(argv)
    lambda_environment(args.model)
    result = measure(
        nine_tokens(args.model),
        args.reps,
        uvicorn=not args.no_uvicorn,
        alternate=not args.back_to_back,
    )
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
