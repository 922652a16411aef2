"""Small shared pieces: progress lines, memory readings, statistics, the worker result protocol, and
child processes watched for time and memory.

Memory comes from /proc (VmRSS now, VmHWM the high-water mark) rather than psutil, so the
benchmark adds no dependency; ru_maxrss is the fallback where /proc is missing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_RESULT "
MIB = 1024 * 1024

# Seconds in progress lines count from the start of the whole run: workers get the parent's
# start time in BENCH_RUN_T0, so their lines read on the same clock.
_RUN_T0 = float(os.environ.get("BENCH_RUN_T0") or time.time())
# Reentrant: the stop handler (bench.cli) may say a line while the main thread is inside say().
_SAY_LOCK = threading.RLock()

Json = dict[str, Any]

# Set by the parent's SIGINT/SIGTERM handler (bench.cli): running children are stopped (run_child,
# bench.prep), the callers start no new one (bench.cli.run_engine, Prep._cached_or_run), and no
# result file is written, so an interrupted run never replaces the last complete one.
STOP = threading.Event()
# What Lambda sets in a function's environment, as far as the service reads it: the platform
# (its defaults: no micro-batching, EMF metrics) and the vCPUs its memory buys.
LAMBDA_ENV = {"AWS_LAMBDA_FUNCTION_NAME": "bge-m3-bench", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "4096"}
# The cold start's split as bench.worker's start_ours reports it (milliseconds).
COLD_SPLIT_MS = (
    "interpreter_ms",
    "imports_ms",
    "tokenizer_ms",
    "session_ms",
    "warmup_ms",
    "load_ms",
    "first_request_ms",
    "total_ms",
)
INTERRUPTED = "interrupted (SIGINT/SIGTERM to the benchmark)"


def say(stage: str, message: str) -> None:
    """One progress line on stderr: `[bench   12.3s] stage: message` (one write, so lines from
    threads and child processes do not interleave)."""
    line = f"[bench {time.time() - _RUN_T0:7.1f}s] {stage}: {message}\n"
    with _SAY_LOCK:
        sys.stderr.write(line)
        sys.stderr.flush()


def run_start_env() -> dict[str, str]:
    """What a child needs to print its progress on the parent's clock."""
    return {"BENCH_RUN_T0": repr(_RUN_T0)}


# ---- memory -------------------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The Vm* lines of /proc/PID/status in kB ({} when the process is gone or not on Linux)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm") and rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0])
    return out


def rss_mib(pid: int | str = "self") -> float:
    """Resident set size now, in MiB."""
    return proc_status(pid).get("VmRSS", 0) / 1024.0


def peak_rss_mib(pid: int | str = "self") -> float:
    """High-water mark of the resident set size, in MiB (VmHWM, else ru_maxrss for this process)."""
    hwm = proc_status(pid).get("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mem_available_mib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("inf")


def read_through(path: Path, chunk: int = 16 * MIB) -> float:
    """Read every file under `path` once and return the MiB read: the model files are then in the
    page cache, so every engine's cold start begins from the same state (a warm host) rather than
    from whatever the builds and earlier engines left there."""
    total = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with file.open("rb", buffering=0) as fh:
            while data := fh.read(chunk):
                total += len(data)
    return total / MIB


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize_ms(samples: Sequence[float]) -> Json:
    return {
        "n": len(samples),
        "p50_ms": round(percentile(samples, 50), 3),
        "p95_ms": round(percentile(samples, 95), 3),
        "min_ms": round(min(samples), 3) if samples else math.nan,
        "max_ms": round(max(samples), 3) if samples else math.nan,
        "samples_ms": [round(s, 3) for s in samples],
    }


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


# ---- machine ------------------------------------------------------------------------------------

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "fma")
VERSIONED = (
    "onnxruntime",
    "onnx",
    "numpy",
    "tokenizers",
    "torch",
    "transformers",
    "FlagEmbedding",
    "bge-m3-lite",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in INTERESTING_FLAGS if f in flags]
    except OSError:
        pass
    return []


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> Json:
    meminfo_total = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                meminfo_total = int(line.split()[1]) / 1024.0 / 1024.0
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gib": round(meminfo_total, 1),
        "host": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in VERSIONED},
    }


# ---- the worker protocol ------------------------------------------------------------------------


def emit_result(result: Mapping[str, Any]) -> None:
    """A worker's answer: one line on stdout, after whatever libraries printed there."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class ChildOutcome:
    returncode: int | None
    result: Json | None
    wall_s: float
    peak_rss_mib: float  # sampled by the parent; the worker reports its own VmHWM too
    killed: str | None = None  # why the parent killed it (timeout, memory cap)
    stdout_tail: str = ""
    extra: Json = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        if self.killed:
            return self.killed
        if self.result is None:
            tail = self.stdout_tail.strip().splitlines()[-5:]
            return f"exited {self.returncode} without a result" + (
                f" (stdout: {' | '.join(tail)})" if tail else ""
            )
        err = self.result.get("error")
        return str(err) if err else None


def run_child(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout_s: float,
    rss_cap_mib: float,
    cwd: Path = REPO_ROOT,
) -> ChildOutcome:
    """Run a worker with stderr passed through live, its stdout collected, its RSS sampled every
    0.1 s; killed when it runs past `timeout_s`, its RSS passes `rss_cap_mib` (so that a plain
    export's 8192-token attention cannot take the shared machine down) or the run is stopped."""
    start = time.monotonic()
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    peak = 0.0
    killed: str | None = None
    try:
        while proc.poll() is None:
            peak = max(peak, rss_mib(proc.pid))
            elapsed = time.monotonic() - start
            if STOP.is_set():
                killed = INTERRUPTED
            elif elapsed > timeout_s:
                killed = f"killed after {timeout_s:.0f} s (time limit)"
            elif peak > rss_cap_mib:
                killed = f"killed at {peak / 1024:.2f} GiB RSS (cap {rss_cap_mib / 1024:.2f} GiB)"
            if killed:
                stop_process(proc)
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            stop_process(proc)
    reader.join(timeout=10)
    result: Json | None = None
    for line in lines:
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    return ChildOutcome(
        returncode=proc.returncode,
        result=result,
        wall_s=time.monotonic() - start,
        peak_rss_mib=round(peak, 1),
        killed=killed,
        stdout_tail="".join(line for line in lines if not line.startswith(RESULT_PREFIX))[-2000:],
    )


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """SIGTERM the process (and its session, which it leads because we started it with
    start_new_session), then SIGKILL if it is still there after `grace_s`."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
