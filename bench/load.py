"""`python -m bench.load`: overload and soak runs against the real server process.

Both start `python -m handler.main` (uvicorn, the Cloud Run entry point) on 127.0.0.1 with the given
model and settings, and drive it over HTTP from this process with httpx:

- `overload`: measure the capacity (closed loop, MAX_CONCURRENT_REQUESTS clients, a few seconds),
  then an open-loop load at `--factor` times it for `--duration` seconds: arrivals on a fixed
  schedule, whatever the answers. Reports statuses counted, connection errors, admitted (200)
  requests' p50/p99, 429s without Retry-After, and the server's RSS before and after.
- `soak`: steady open-loop traffic at `--load` of the capacity for `--duration` seconds (default
  10 minutes), reporting per window the server's RSS and p50/p99, and the drift from the first
  window to the last.

Without `--model` it builds (and caches under bench/work) the tiny random-weight BGE-M3 model;
its figures say how the server behaves under load, not how fast BGE-M3 is.

    python -m bench.load overload --duration 20 --factor 4
    python -m bench.load overload --repeat 3 --trim   # RSS after each run, and after malloc_trim
    python -m bench.load soak --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
BODY = {"input": ["What is BGE M3?", "BGE M3 is an embedding model for retrieval."]}
START_TIMEOUT_S = 300.0


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str

    def memory_mib(self) -> dict[str, float]:
        """VmRSS and its parts: RssAnon (heaps, arenas) and RssFile (mapped files: the model's
        weights, libraries), so that growth can be told apart from pages of the model touched."""
        fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
        out: dict[str, float] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in fields:
                out[fields[key]] = round(int(line.split()[1]) / 1024.0, 1)
        if "rss" not in out:
            raise RuntimeError("no VmRSS for the server process")
        return out

    def rss_mib(self) -> float:
        return self.memory_mib()["rss"]

    def trim(self) -> None:
        """Measurement only: the server started with `trim=True` calls glibc's malloc_trim(0) on
        SIGUSR2, returning freed heap to the system; what RSS is left is memory in use."""
        self.proc.send_signal(signal.SIGUSR2)
        time.sleep(1.0)  # the handler runs between the event loop's callbacks

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# `python -m handler.main` with a SIGUSR2 handler that calls malloc_trim(0): for `--trim` only.
TRIMMING_MAIN = (
    "import ctypes, runpy, signal; "
    "libc = ctypes.CDLL('libc.so.6'); "
    "signal.signal(signal.SIGUSR2, lambda *_: libc.malloc_trim(0)); "
    "runpy.run_module('handler.main', run_name='__main__', alter_sys=True)"
)


def start_server(model: Path, env: dict[str, str], *, trim: bool = False) -> Server:
    """`python -m handler.main` on a free loopback port; returns once it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-c", TRIMMING_MAIN] if trim else [sys.executable, "-m", "handler.main"],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "MODEL_PATH": str(model),
            "HOST": "127.0.0.1",
            "PORT": "0",
            "API_KEY": "",
            **env,
        },
        stdout=subprocess.DEVNULL,  # one JSON line per request: not wanted here
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    for line in proc.stderr:
        if "serving on http://" in line:
            url = line.split("serving on ", 1)[1].split(" ", 1)[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            # The app is built after the models loaded: ready now, or it will never be.
            ready = httpx.get(f"{url}/health/ready", timeout=30)
            if ready.status_code != 200:
                proc.kill()
                raise RuntimeError(f"the server is not ready: {ready.text}")
            return Server(proc, url)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


@dataclass
class Outcome:
    status: int | str  # an HTTP status, or the name of the connection error
    latency_s: float  # as this client saw it, its own queueing included
    retry_after: str | None = None
    server_ms: float | None = None  # x-total-time: arrival in the app to the answer


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def statuses(self) -> dict[str, int]:
        return dict(sorted(Counter(str(o.status) for o in self.outcomes).items()))

    def admitted_ms(self, q: float, *, server: bool = False) -> float | None:
        times = sorted(
            (o.server_ms or 0.0) if server else o.latency_s * 1000.0
            for o in self.outcomes
            if o.status == 200
        )
        if not times:
            return None
        return times[min(len(times) - 1, int(q * len(times)))]

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.outcomes),
            "statuses": self.statuses(),
            "connection_errors": sum(isinstance(o.status, str) for o in self.outcomes),
            "429_without_retry_after": sum(
                o.status == 429 and not o.retry_after for o in self.outcomes
            ),
            "admitted_p50_ms": _round(self.admitted_ms(0.50)),
            "admitted_p99_ms": _round(self.admitted_ms(0.99)),
            # The server's own view: on a machine where the load generator competes with the
            # server for the cores, the client-side figures include the generator's backlog.
            "admitted_server_p50_ms": _round(self.admitted_ms(0.50, server=True)),
            "admitted_server_p99_ms": _round(self.admitted_ms(0.99, server=True)),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def _one(client: httpx.AsyncClient, url: str) -> Outcome:
    start = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/embeddings", json=BODY)
    except httpx.TransportError as exc:  # reset, refused, timed out: all count as failures
        return Outcome(type(exc).__name__, time.perf_counter() - start)
    total = r.headers.get("x-total-time")
    return Outcome(
        r.status_code,
        time.perf_counter() - start,
        r.headers.get("retry-after"),
        float(total) if total else None,
    )


def _client() -> httpx.AsyncClient:
    # Enough connections that the client never queues: an open loop sends on schedule.
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=512)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0))


async def open_loop(url: str, rate: float, duration_s: float) -> Tally:
    """Requests at `rate` per second for `duration_s`, each sent on schedule whatever the
    state of the others; returns once every one has an outcome."""
    tally = Tally()
    async with _client() as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i in range(max(1, int(rate * duration_s))):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_one(client, url)))
        tally.outcomes = list(await asyncio.gather(*tasks))
    return tally


async def capacity(url: str, clients: int, duration_s: float) -> float:
    """Requests per second that `clients` closed-loop clients get answered with 200."""
    done = 0
    async with _client() as client:
        stop = time.monotonic() + duration_s

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop:
                if (await _one(client, url)).status == 200:
                    done += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return done / (time.monotonic() - start)


def overload(
    server: Server, *, clients: int, factor: float, duration_s: float, trim: bool = False
) -> dict[str, Any]:
    asyncio.run(open_loop(server.url, 20.0, 1.0))  # warm the process up
    before = server.memory_mib()
    cap = asyncio.run(capacity(server.url, clients, min(5.0, duration_s)))
    tally = asyncio.run(open_loop(server.url, cap * factor, duration_s))
    after = server.memory_mib()
    result = {
        "capacity_rps": round(cap, 1),
        "offered_rps": round(cap * factor, 1),
        "duration_s": duration_s,
        **tally.summary(),
        "rss_mib_before": before["rss"],
        "rss_mib_after": after["rss"],
        "rss_change_pct": round(100.0 * (after["rss"] - before["rss"]) / before["rss"], 2),
        "memory_mib_before": before,
        "memory_mib_after": after,
    }
    if trim:
        server.trim()
        result["memory_mib_after_trim"] = server.memory_mib()
    return result


def repeated_overload(server: Server, *, repeat: int, **kwargs: Any) -> dict[str, Any]:
    """`overload` `repeat` times in the same server: RSS that keeps growing run after run is a
    leak; RSS that grows once and then holds is a plateau (arenas and caches sized by the peak)."""
    runs = [overload(server, **kwargs) for _ in range(repeat)]
    if repeat == 1:
        return runs[0]
    return {
        "runs": runs,
        "rss_mib_after_each": [run["rss_mib_after"] for run in runs],
        "rss_change_pct_first_to_last_after": round(
            100.0
            * (runs[-1]["rss_mib_after"] - runs[0]["rss_mib_after"])
            / runs[0]["rss_mib_after"],
            2,
        ),
    }


def soak(
    server: Server, *, clients: int, load: float, duration_s: float, window_s: float
) -> dict[str, Any]:
    asyncio.run(open_loop(server.url, 20.0, 1.0))
    cap = asyncio.run(capacity(server.url, clients, 5.0))
    rate = cap * load
    windows = []
    elapsed = 0.0
    while elapsed < duration_s:
        span = min(window_s, duration_s - elapsed)
        tally = asyncio.run(open_loop(server.url, rate, span))
        elapsed += span
        windows.append({"end_s": round(elapsed, 1), "rss_mib": round(server.rss_mib(), 1)})
        windows[-1].update(tally.summary())
    first, last = windows[0], windows[-1]
    return {
        "capacity_rps": round(cap, 1),
        "offered_rps": round(rate, 1),
        "duration_s": duration_s,
        "windows": windows,
        "rss_drift_pct": round(100.0 * (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"], 2),
        "p99_drift_ms": _round(
            None
            if first["admitted_p99_ms"] is None or last["admitted_p99_ms"] is None
            else last["admitted_p99_ms"] - first["admitted_p99_ms"]
        ),
    }


def tiny_model(work_dir: Path) -> Path:
    from bench.prep import Prep

    prep = Prep(work_dir, "tiny", rebuild=False, timeout_s=1800)
    if not prep.make_source().ok:
        raise RuntimeError(f"cannot make the tiny source model: {prep.source.error}")
    art = prep.build_ours("int8")
    if not art.ok:
        raise RuntimeError(f"cannot build the tiny model: {art.error}")
    return art.path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("mode", choices=["overload", "soak"])
    parser.add_argument("--model", type=Path, help="a model_build output (default: tiny model)")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench" / "work")
    parser.add_argument("--max-concurrent", type=int, default=4, help="MAX_CONCURRENT_REQUESTS")
    parser.add_argument("--duration", type=float, help="seconds (overload 20, soak 600)")
    parser.add_argument("--factor", type=float, default=4.0, help="overload: times capacity")
    parser.add_argument("--load", type=float, default=0.5, help="soak: fraction of capacity")
    parser.add_argument("--window", type=float, default=30.0, help="soak: seconds per window")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    parser.add_argument(
        "--repeat", type=int, default=1, help="overload: runs in the same server (leak or plateau)"
    )
    parser.add_argument(
        "--trim",
        action="store_true",
        help="measurement only: malloc_trim(0) in the server after each overload run, then RSS",
    )
    args = parser.parse_args(argv)
    model = args.model or tiny_model(args.work_dir)
    server = start_server(
        model,
        {"MAX_CONCURRENT_REQUESTS": str(args.max_concurrent), "METRICS": "off"},
        trim=args.trim,
    )
    try:
        if args.mode == "overload":
            result = repeated_overload(
                server,
                repeat=args.repeat,
                clients=args.max_concurrent,
                factor=args.factor,
                duration_s=args.duration or 20.0,
                trim=args.trim,
            )
        else:
            result = soak(
                server,
                clients=args.max_concurrent,
                load=args.load,
                duration_s=args.duration or 600.0,
                window_s=args.window,
            )
    finally:
        exit_code = server.stop()
    result = {
        "mode": args.mode,
        "model": str(model),
        # The tiny random-weight model: how the server behaves under load, not BGE-M3's speed.
        "tiny_model": args.model is None or "tiny" in model.name,
        "max_concurrent_requests": args.max_concurrent,
        # glibc's arena cap, where the run set one (MALLOC_ARENA_MAX=2 python -m bench.load ...).
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
        "server_exit_code": exit_code,
        **result,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
