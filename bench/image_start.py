"""The cold start inside the Lambda image, with the page cache warm and cold.

    python -m bench.image_start --model DIR [--rounds 3] [--out FILE.json]
    python -m bench.image_start --smoke              # the tiny fixture's int8 build (bench.prep)

Builds infra/lambda.Dockerfile with the int8 model DIR baked in (as infra/scripts/ci_image_test.sh
does: our own dockerd, a debootstrapped stand-in base, wheels from the host), or reuses the image
built before for the same model and code (its tag is their digest; docker's data root is kept, in
DOCKER_ROOT), then starts fresh containers as Lambda runs them and times new process ->
first 200 through `handler.lambda_function.handler` with a Function URL event (bench.worker's
`cold` job, the same split as the host's cold start). States, in turn, each round:

- cold: the whole page cache dropped first (`echo 3 > /proc/sys/vm/drop_caches`, as root): every
  file the container reads (Python, the dependencies, the model) comes from disk once;
- warm: right after, nothing evicted: every file is in the page cache;
- cold-model: only the model files of the image's layers evicted (posix_fadvise DONTNEED);
- host: the same worker on the host with the same model directory, warm, for comparison under the
  same load (the host figure of `python -m bench` comes from another moment).

The medians of each state and their split go to JSON; `python -m bench` runs this as a stage.
bench/image_start.sh does the docker part; this module drives it, parses what it prints and
summarises. dockerd never outlives the run (the script's trap; a timeout here stops the script).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    COLD_SPLIT_MS,
    REPO_ROOT,
    RESULT_PREFIX,
    STOP,
    Json,
    load_average,
    percentile,
    say,
)
from bench.prep import code_digest, digest_files

SCRIPT = REPO_ROOT / "bench" / "image_start.sh"
STATES = ("cold", "warm", "cold-model", "host")
# Outside the repository: it holds whole images' file trees (Python packages included), which tools
# that walk the repository, mypy's package discovery among them, must not see.
DOCKER_ROOT = Path(os.environ.get("BENCH_DOCKER_ROOT", "/var/tmp/bge-m3-bench-docker"))
# A short query, as a search request sends it: the first request is about the start, not the text.
QUERY = "What is the capital of France?"
# The split of bench.worker's cold start (start_ours), and what the host adds around it.
SPLIT = (
    *COLD_SPLIT_MS,
    "container_start_ms",
    "docker_run_to_200_ms",
    "peak_rss_mib",
    "cpu_ms",
    "disk_read_mib",
)
EVICTED = {
    "page-cache:all": "the whole page cache (drop_caches): the image's files and the host's",
    "fadvise:data-root": "every file in docker's data root (posix_fadvise; drop_caches refused)",
    "fadvise:model": "the model files of the image's layers (posix_fadvise)",
    "none": "nothing (the previous run, or an untimed one, left the files in the page cache)",
}


# ---- what the script prints -----------------------------------------------------------------


@dataclass
class Run:
    round: int
    state: str
    evicted: str
    host_t0: float
    exit_status: int | None = None
    host_t1: float | None = None
    result: Json | None = None
    output: list[str] = field(default_factory=list)

    def to_json(self) -> Json:
        """One run: the worker's cold start plus what the container's own start added."""
        out: Json = {"round": self.round, "state": self.state, "evicted": self.evicted}
        cold = (self.result or {}).get("cold_start")
        if self.exit_status != 0 or not isinstance(cold, dict):
            error = (self.result or {}).get("error") or f"exit status {self.exit_status}"
            tail = " | ".join(self.output[-5:])
            out["error"] = f"{error}" + (f" (output: {tail})" if tail else "")
            return out
        out.update({k: v for k, v in cold.items() if k != "t0_epoch_s"})
        t0 = cold.get("t0_epoch_s")
        if isinstance(t0, int | float) and self.state != "host":
            # The same kernel clock inside and out: `docker run` -> the interpreter's start.
            start_ms = (float(t0) - self.host_t0) * 1000.0
            out["container_start_ms"] = round(start_ms, 3)
            out["docker_run_to_200_ms"] = round(start_ms + float(cold["total_ms"]), 3)
        return out


def parse_output(lines: Iterable[str]) -> tuple[Json, list[Run]]:
    """The script's stdout -> (info, runs). Lines between a run's start and end that are not the
    worker's result are kept as that run's output (for errors)."""
    info: Json = {}
    runs: list[Run] = []
    current: Run | None = None
    for raw in lines:
        line = raw.rstrip("\n")
        if line.startswith("IMAGE_START_INFO "):
            _, key, value = line.split(" ", 2)
            info[key] = int(value) if value.isdigit() else value
        elif line.startswith("IMAGE_START_RUN "):
            _, rnd, state, evicted, t0 = line.split()
            current = Run(int(rnd), state, evicted, float(t0))
            runs.append(current)
        elif line.startswith("IMAGE_START_END ") and current is not None:
            _, _rnd, _state, status, t1 = line.split()
            current.exit_status, current.host_t1 = int(status), float(t1)
            current = None
        elif line.startswith(RESULT_PREFIX) and current is not None:
            current.result = json.loads(line[len(RESULT_PREFIX) :])
        elif current is not None and line.strip():
            current.output.append(line[:300])
    return info, runs


def summarize(runs: Sequence[Json], states: Sequence[str] = STATES) -> Json:
    """Per state: the median of each part of the split over the runs that answered (the untimed
    `prime` run is left out), the runs themselves and their errors."""
    out: Json = {}
    for state in states:
        mine = [r for r in runs if r["state"] == state]
        ok = [r for r in mine if "error" not in r]
        medians: Json = {}
        for key in SPLIT:
            values = [float(r[key]) for r in ok if isinstance(r.get(key), int | float)]
            medians[key] = round(percentile(values, 50), 1) if values else None
        out[state] = {
            "n": len(ok),
            "evicted": EVICTED.get(mine[0]["evicted"], mine[0]["evicted"]) if mine else None,
            "median": medians,
            "total_ms_runs": [r.get("total_ms") for r in ok],
            "errors": [f"round {r['round']}: {r['error']}" for r in mine if "error" in r],
        }
    return out


# ---- running it -----------------------------------------------------------------------------


def unusable() -> str | None:
    """Why the image cannot be built and run here, or None."""
    if sys.platform != "linux":
        return "needs Linux (our own dockerd)"
    if os.geteuid() != 0:
        return "needs root: our own dockerd, debootstrap, and drop_caches for the cold runs"
    missing = [c for c in ("dockerd", "debootstrap") if shutil.which(c) is None]
    if missing and shutil.which("apt-get") is None:
        return f"{' and '.join(missing)} missing, and no apt-get to install them"
    if shutil.which("docker") is None and not Path("/usr/bin/docker").exists() and not missing:
        return "no docker CLI"
    return None


def image_tag(model: Path) -> str:
    """The model's manifest (its files' digests) and everything the image is built from: the same
    tag means the same image, so a later run reuses it."""
    files = [
        REPO_ROOT / p
        for p in (
            "infra/lambda.Dockerfile",
            "requirements.txt",
            "infra/scripts/install_deps.sh",
            "infra/scripts/docker_lib.sh",
            "infra/scripts/fix_permissions.sh",
            "infra/scripts/check_arch.sh",
            "infra/scripts/check_no_torch.sh",
        )
    ]
    digest = code_digest(
        "handler", extra=[digest_files(files), (model / "manifest.json").read_text()]
    )
    return f"bge-m3-bench/lambda:{digest[:16]}"


def evict_files(paths: Iterable[str]) -> int:
    """Drop these files' pages from the page cache (POSIX_FADV_DONTNEED); the count evicted."""
    done = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            done += 1
        finally:
            os.close(fd)
    return done


def run_script(cmd: Sequence[str], timeout_s: float) -> tuple[int | None, list[str], str | None]:
    """Run the script with its stderr passed through; stopped (SIGTERM to the script, whose trap
    stops dockerd; then its whole session) when it runs past `timeout_s` or the run is stopped."""
    proc = subprocess.Popen(
        list(cmd),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)},
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    start, killed = time.monotonic(), None
    while proc.poll() is None:
        if STOP.is_set():
            killed = "interrupted"
        elif time.monotonic() - start > timeout_s:
            killed = f"stopped after {timeout_s:.0f} s (time limit)"
        if killed:
            proc.send_signal(signal.SIGTERM)
            try:  # the trap removes the containers and stops dockerd (up to 30 s)
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            break
        time.sleep(0.2)
    reader.join(timeout=10)
    return proc.returncode, lines, killed


def measure(
    model: Path,
    *,
    rounds: int,
    docker_root: Path = DOCKER_ROOT,
    states: Sequence[str] = STATES,
    timeout_s: float = 3600,
    run_timeout_s: float = 600,
) -> Json:
    """Build (or reuse) the image with `model` and time its cold starts; the stage's JSON."""
    why = unusable()
    if why:
        return {"skipped": why}
    model = model.resolve()
    if not (model / "manifest.json").is_file():
        return {"error": f"no manifest.json in {model}"}
    tag = image_tag(model)
    spec = {"engine": "ours-int8", "kind": "ours", "job": "cold", "query": QUERY}
    data_root = docker_root.resolve()
    cmd = [
        "bash", str(SCRIPT),
        "--model", str(model),
        "--tag", tag,
        "--data-root", str(data_root),
        "--rounds", str(rounds),
        "--states", " ".join(states),
        "--spec", json.dumps(spec),
        "--run-timeout", str(int(run_timeout_s)),
    ]  # fmt: skip
    say("image", f"Lambda image {tag} with {model}: {rounds} round(s) of {', '.join(states)}")
    t, load_before = time.monotonic(), load_average()
    status, lines, killed = run_script(cmd, timeout_s)
    info, runs = parse_output(lines)
    records = [r.to_json() for r in runs]
    doc: Json = {
        "what": "new process -> first 200 through handler.lambda_function.handler (Function URL "
        "event), in a fresh container of the Lambda image (stand-in Debian base), non-root, "
        "read-only root, no network",
        "model": str(model),
        "image": tag,
        "rounds": rounds,
        "query": QUERY,
        "info": info,
        "states": summarize(records, states),
        "runs": records,
        "wall_s": round(time.monotonic() - t, 1),
        # The machine may be shared: its load moves every wall time here.
        "load_average": {"before": load_before, "after": load_average()},
    }
    if killed or status != 0:
        doc["error"] = killed or f"bench/image_start.sh exited {status}"
    for state, figures in doc["states"].items():
        say("image", f"{state}: {describe(figures['median'])}")
    return doc


def describe(median: Json) -> str:
    """One progress line for a state's medians."""
    if median.get("total_ms") is None:
        return "no run answered"

    def secs(key: str) -> str:
        value = median.get(key)
        return "–" if value is None else f"{value / 1000:.2f} s"

    line = (
        f"median process -> 200 {secs('total_ms')} (imports {secs('imports_ms')}, load "
        f"{secs('load_ms')}; CPU {secs('cpu_ms')}, "
        f"read from disk {median.get('disk_read_mib')} MiB)"
    )
    if median.get("docker_run_to_200_ms") is not None:
        line += f", docker run -> 200 {secs('docker_run_to_200_ms')}"
    return line


def smoke_model(work_dir: Path) -> Path | str:
    """The tiny fixture's int8 build (cached in the work directory by bench.prep)."""
    from bench.prep import Prep

    prep = Prep(work_dir, "tiny", rebuild=False, timeout_s=600)
    if not prep.make_source().ok:
        return f"no source model: {prep.source.error}"
    art = prep.build_ours("int8")
    return art.path if art.ok else f"no int8 model: {art.error}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.image_start", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, help="an int8 model directory (manifest.json)")
    parser.add_argument("--smoke", action="store_true", help="the tiny fixture's int8 build")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each state (default 3)")
    parser.add_argument("--states", nargs="+", default=list(STATES), choices=STATES)
    parser.add_argument(
        "--work-dir", type=Path, default=REPO_ROOT / "bench" / "work", help="where --smoke builds"
    )
    parser.add_argument(
        "--docker-root",
        type=Path,
        default=DOCKER_ROOT,
        help=f"docker's data root, kept between runs (default {DOCKER_ROOT}, BENCH_DOCKER_ROOT)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for it all")
    # For bench/image_start.sh: drop these files from the page cache.
    parser.add_argument("--evict-files", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.evict_files:
        evict_files(args.evict_files)
        return 0
    if args.smoke == (args.model is not None):
        parser.error("give one of --model DIR and --smoke")
    work_dir = args.work_dir.resolve()
    model = smoke_model(work_dir) if args.smoke else args.model
    if isinstance(model, str):
        doc: Json = {"error": model}
    else:
        doc = measure(
            model,
            rounds=args.rounds,
            docker_root=args.docker_root,
            states=args.states,
            timeout_s=args.timeout,
        )
    text = json.dumps(doc, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        say("image", f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0 if not (doc.get("error") or doc.get("skipped")) else 1


if __name__ == "__main__":
    sys.exit(main())
