"""The README's quick start as a reader runs it.

- `make serve` itself (its real recipe: the quick-start model build, then `python -m
  handler.main`): it listens where its banner says, loopback unless HOST says otherwise;
- the Python line of the "Quick start" section, taken from README.md as written, in the project's
  environment (the one `make serve` and `make test` install, whose `python` the README puts first
  on PATH), against `python -m handler.main` serving a BGE-M3-layout model (the tiny fixture, id
  `bge-m3`) on loopback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README_URL = "http://127.0.0.1:8000"  # where `make serve` listens by default


def quick_start_python_line() -> str:
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    (line,) = [line for block in blocks for line in block.splitlines() if line.startswith("python")]
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tiny_int8: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m handler.main` in its own process, as `make serve` starts it."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "MODEL_PATH": str(tiny_int8), "HOST": "127.0.0.1", "PORT": str(port)}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "handler.main"], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # readiness poll, bounded; nothing asserts on time
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"handler.main did not serve:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_readme_python_line_works_as_written(served: str) -> None:
    line = quick_start_python_line()
    assert README_URL in line
    # Only the port differs from the README's: the test server has a free one of its own.
    command = line.replace(README_URL, served)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    request = urllib.request.Request(
        f"{served}/v1/embeddings",
        data=json.dumps({"model": "bge-m3", "input": "hi"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        dims = len(json.load(r)["data"][0]["embedding"])
    assert proc.stdout.strip() == str(dims)


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on this port, from /proc/net/tcp."""
    found = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = row.split()[1], row.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the runs below: the first builds the model, the next reuse it (as a second
    `make serve` does)."""
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize("host", [None, "127.0.0.2"], ids=["default", "HOST-given"])
def test_make_serve_listens_where_its_banner_says(
    bge_m3_source: Path, models_dir: Path, tmp_path: Path, host: str | None
) -> None:
    # The Makefile's environment is this one: its python behind VENV, its install step marked done.
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv_bin / "python").chmod(0o755)
    (tmp_path / "installed").touch()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"HOST", "MAKEFLAGS", "MAKELEVEL"}}
    env |= {"MODEL_SOURCE": str(bge_m3_source), "HF_HUB_OFFLINE": "1", "PORT": str(port)}
    if host is not None:
        env["HOST"] = host
    expected = host or "127.0.0.1"
    make = [
        "make", "--no-print-directory", "serve",
        f"VENV={tmp_path / 'venv'}", f"STAMP={tmp_path / 'installed'}",
        f"MODELS_DIR={models_dir}",
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            make, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while expected not in listening_addresses(port) or "serving" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"make serve did not listen:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        (banner,) = [line for line in log.read_text().splitlines() if line.startswith("serving")]
        assert f"on http://{expected}:{port} " in banner
        assert listening_addresses(port) == {expected}
        # handler.main loads the model before uvicorn binds: listening means ready.
        with urllib.request.urlopen(f"http://{expected}:{port}/health", timeout=30) as r:
            assert r.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
