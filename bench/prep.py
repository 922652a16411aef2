"""Model preparation, cached in the work directory.

- the source: `python -m model_build.fixture --size full|tiny` (random weights, BGE-M3's layout);
- ours: `python -m model_build --recipe bge-m3 --precision P` on it, the command users run;
- plain onnxruntime: `python -m bench.export` (a straight export, and quantize_dynamic on it);
- bge-m3-lite: `python -m bench.lite` (its own fuse and int8 quantize; full size only).

Each result directory has a stamp file beside it (`<dir>.stamp.json`) with a digest of everything
that decides its content (the build code, the source's stamp, the precision); a directory whose
stamp differs is rebuilt, so `make bench` after a change to the quantizer measures the new build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    INTERRUPTED,
    REPO_ROOT,
    STOP,
    Json,
    package_version,
    run_start_env,
    say,
)

BUILD_EXIT_MEANING = {
    1: "the fidelity gate refused the model",
    2: "a usage or source problem",
    3: "a bug in model_build",
}


@dataclass
class Artifact:
    name: str
    path: Path
    ok: bool = False
    cached: bool = False
    build_s: float | None = None
    error: str | None = None
    size_mib: float | None = None
    manifest: Json = field(default_factory=dict)

    def to_json(self) -> Json:
        info: Json = {
            "path": str(self.path),
            "ok": self.ok,
            "cached": self.cached,
            "build_s": self.build_s,
            "size_mib": self.size_mib,
        }
        if self.error:
            info["error"] = self.error
        for key in ("precision", "quantization", "validation", "bench_baseline"):
            if key in self.manifest:
                info[key] = self.manifest[key]
        return info


def digest_files(paths: Iterable[Path], extra: Sequence[str] = ()) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(REPO_ROOT)).encode())
        h.update(path.read_bytes())
    for item in extra:
        h.update(item.encode())
    return h.hexdigest()


def code_digest(*packages: str, extra: Sequence[str] = ()) -> str:
    files: list[Path] = []
    for package in packages:
        root = REPO_ROOT / package
        files += root.rglob("*.py") if root.is_dir() else [root]
        if root.is_dir():
            files += [p for p in root.rglob("*.json") if "__pycache__" not in p.parts]
    return digest_files([p for p in files if p.is_file()], extra)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".stamp.json")


def cached(path: Path, stamp: str, needed: str) -> bool:
    try:
        recorded = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return False
    return bool(recorded.get("stamp") == stamp and (path / needed).is_file())


def write_stamp(path: Path, stamp: str, build_s: float) -> None:
    _stamp_path(path).write_text(json.dumps({"stamp": stamp, "build_s": round(build_s, 1)}) + "\n")


def recorded_build_s(path: Path) -> float | None:
    try:
        value = json.loads(_stamp_path(path).read_text()).get("build_s")
    except (OSError, ValueError):
        return None
    return float(value) if value is not None else None


def dir_size_mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1024**2, 1)


def run_logged(cmd: Sequence[str], *, label: str, timeout_s: float) -> tuple[int, str]:
    """Run a build step with its stderr shown live (prefixed) and its last lines kept."""
    env = {**os.environ, **run_start_env(), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    tail: deque[str] = deque(maxlen=25)
    proc = subprocess.Popen(
        list(cmd),
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    watchdog = threading.Thread(target=_kill_when_due, args=(proc, timeout_s), daemon=True)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            sys.stderr.write(f"    {label} | {line.rstrip()}\n")
            sys.stderr.flush()
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, "\n".join(tail)


def _kill_when_due(proc: subprocess.Popen[str], timeout_s: float) -> None:
    """Kill a build step at its time limit, or as soon as the run is stopped."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if STOP.is_set() or time.monotonic() > deadline:
            proc.kill()
            return
        time.sleep(0.2)


class Prep:
    def __init__(self, work_dir: Path, size: str, *, rebuild: bool, timeout_s: float):
        self.work_dir = work_dir
        self.size = size
        self.rebuild = rebuild
        self.timeout_s = timeout_s
        self.source = Artifact("source", work_dir / f"source-{size}")
        self._source_stamp = ""

    # -- the random-weight source --------------------------------------------------------------

    def make_source(self) -> Artifact:
        art = self.source
        stamp = code_digest("model_build/fixture.py", "model_build/reference", extra=[self.size])
        self._source_stamp = stamp
        cmd = [sys.executable, "-m", "model_build.fixture", "--out", str(art.path)]
        self._cached_or_run(
            art, stamp, "pytorch_model.bin", f"source ({self.size})",
            "python -m model_build.fixture", [*cmd, "--size", self.size],
        )  # fmt: skip
        if art.ok:
            art.size_mib = dir_size_mib(art.path)
        return art

    # -- our builds -------------------------------------------------------------------------------

    def build_ours(self, precision: str) -> Artifact:
        art = Artifact(f"ours-{precision}", self.work_dir / f"{self.size}-ours-{precision}")
        if not self.source.ok:
            art.error = f"no source model ({self.source.error})"
            return art
        if importlib.util.find_spec("model_build.__main__") is None:
            art.error = (
                "`python -m model_build` does not exist yet (model_build/__main__.py is missing)"
            )
            say("prep", f"{art.name}: skipped: {art.error}")
            return art
        stamp = code_digest(
            "model_build",
            "handler/engine/manifest.py",
            extra=[self._source_stamp, precision],
        )
        cmd = [
            sys.executable, "-m", "model_build",
            "--source", str(self.source.path),
            "--recipe", "bge-m3",
            "--precision", precision,
            "--out", str(art.path),
            "--force",
        ]  # fmt: skip
        self._cached_or_run(
            art, stamp, "manifest.json", art.name,
            f"python -m model_build --precision {precision}", cmd, clear=False,
        )  # fmt: skip
        self._describe(art)
        return art

    # -- plain onnxruntime ------------------------------------------------------------------------

    def export_plain(self) -> Artifact:
        art = Artifact("ort-fp32", self.work_dir / f"{self.size}-ort-fp32")
        if not self.source.ok:
            art.error = f"no source model ({self.source.error})"
            return art
        stamp = code_digest("bench/export.py", extra=[self._source_stamp])
        cmd = [sys.executable, "-m", "bench.export", "--source", str(self.source.path)]
        self._cached_or_run(
            art, stamp, "manifest.json", art.name, "torch.onnx.export",
            [*cmd, "--out", str(art.path)],
        )  # fmt: skip
        self._describe(art)
        return art

    def quantize_plain(self, fp32: Artifact) -> Artifact:
        art = Artifact("ort-int8", self.work_dir / f"{self.size}-ort-int8")
        if not fp32.ok:
            art.error = f"no plain fp32 export ({fp32.error})"
            return art
        stamp = code_digest("bench/export.py", extra=[self._source_stamp, "quantize_dynamic"])
        cmd = [sys.executable, "-m", "bench.export", "--quantize-from", str(fp32.path)]
        self._cached_or_run(
            art, stamp, "manifest.json", art.name, "quantize_dynamic (defaults)",
            [*cmd, "--out", str(art.path)],
        )  # fmt: skip
        self._describe(art)
        return art

    # -- bge-m3-lite -------------------------------------------------------------------------------

    def build_lite(self) -> Artifact:
        from bench.lite import MODEL_FILE, VERSION

        art = Artifact("lite-int8", self.work_dir / f"{self.size}-lite-int8")
        if not self.source.ok:
            art.error = f"no source model ({self.source.error})"
            return art
        if self.size != "full":
            art.error = "bge-m3-lite runs only BGE-M3's full shape (hidden size 1024, 16 heads)"
            return art
        installed = package_version("bge-m3-lite")
        if installed != VERSION:
            art.error = (
                f"bge-m3-lite {VERSION} is needed (installed: {installed}); "
                "pip install -r requirements-dev.txt"
            )
            say("prep", f"{art.name}: skipped: {art.error}")
            return art
        stamp = code_digest("bench/lite.py", "bench/export.py", extra=[self._source_stamp, VERSION])
        cmd = [sys.executable, "-m", "bench.lite", "--source", str(self.source.path)]
        self._cached_or_run(
            art, stamp, MODEL_FILE, art.name, f"bge-m3-lite {VERSION} fuse + quantize",
            [*cmd, "--out", str(art.path)],
        )  # fmt: skip
        self._describe(art)
        return art

    # -- helpers ----------------------------------------------------------------------------------

    def _cached_or_run(
        self,
        art: Artifact,
        stamp: str,
        needed: str,
        label: str,
        what: str,
        cmd: list[str],
        *,
        clear: bool = True,
    ) -> None:
        """Reuse `art.path` when its stamp matches (and not --rebuild); else run `cmd` to make it,
        from an emptied directory unless the command replaces it itself (`clear=False`)."""
        if STOP.is_set():
            art.error = INTERRUPTED
            return
        if not self.rebuild and cached(art.path, stamp, needed):
            art.ok, art.cached, art.build_s = True, True, recorded_build_s(art.path)
            say("prep", f"{label}: cached at {art.path}")
            return
        say("prep", f"{label}: {what} -> {art.path}")
        if clear:
            shutil.rmtree(art.path, ignore_errors=True)
        self._run(art, cmd, stamp, needed)

    def _run(self, art: Artifact, cmd: list[str], stamp: str, needed: str) -> None:
        start = time.monotonic()
        _stamp_path(art.path).unlink(missing_ok=True)
        art.path.parent.mkdir(parents=True, exist_ok=True)
        code, tail = run_logged(cmd, label=art.name, timeout_s=self.timeout_s)
        art.build_s = round(time.monotonic() - start, 1)
        if code == 0 and (art.path / needed).is_file():
            art.ok = True
            write_stamp(art.path, stamp, art.build_s)
            say("prep", f"{art.name}: built in {art.build_s:.1f}s")
            return
        meaning = (
            BUILD_EXIT_MEANING.get(code, "failed")
            if code > 0
            else f"killed by signal {-code} (the time limit, or out of memory)"
        )
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        art.error = f"`{' '.join(cmd[1:4])} ...` exited {code}: {meaning}; last line: {last}"
        say("prep", f"{art.name}: FAILED: {art.error}")

    def _describe(self, art: Artifact) -> None:
        if not art.ok:
            return
        art.size_mib = dir_size_mib(art.path)
        try:
            document = json.loads((art.path / "manifest.json").read_text())
        except (OSError, ValueError):
            document = {}
        # What another tool recorded about its artifact (the baselines) sits under "notes".
        art.manifest = {**document, **document.get("notes", {})}
