"""Every shell and Python example in README.md and docs/*.md, run against a served model.

The server is `python -m handler.main` on loopback serving the tiny fixture (BGE-M3's exact layout,
all three heads, id `bge-m3`) with an API key set. The examples are written for a reader, so the
test rewrites only what a reader would set themselves, the same way for every block:

- `http://127.0.0.1:8000` (where `make serve` listens) becomes the test server's address, and the
  environment has `BASE` (that address) and `API_KEY` (the server's key);
- `curl` fails on an HTTP error status (`--fail-with-body`), so a 4xx example fails its test;
- blocks run in an empty directory whose `.venv/bin/activate` puts this interpreter first on PATH.

A block is skipped only with an HTML comment on the line before it, `<!-- not run: REASON -->`
(deploy commands, builds from the hub, long jobs); `<!-- example: auth off -->` runs it against a
second server without a key, as `make serve` starts one.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_URL = "http://127.0.0.1:8000"
API_KEY = "sk-docs-examples"
BLOCK = re.compile(r"^```(sh|bash|python)\n(.*?)^```", flags=re.S | re.M)
MARKER = re.compile(r"<!--\s*(not run|example):\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Example:
    page: str
    line: int
    language: str
    code: str
    marker: str  # "" (run with the key), "auth off", or "not run: REASON"

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def examples() -> list[Example]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = MARKER.fullmatch(before.strip())
            marker = ""
            if mark and mark.group(1) == "not run":
                marker = f"not run: {mark.group(2)}"
            elif mark:
                marker = mark.group(2)
            found.append(
                Example(
                    page=str(page.relative_to(ROOT)),
                    line=text[: m.start()].count("\n") + 1,
                    language=m.group(1),
                    code=m.group(2),
                    marker=marker,
                )
            )
    return found


ALL = examples()
RUN = [e for e in ALL if not e.marker.startswith("not run")]
NOT_RUN = [e for e in ALL if e.marker.startswith("not run")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(model: Path, log: Path, key: str | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "MODEL_PATH": str(model), "HOST": "127.0.0.1", "PORT": str(port)}
    env.pop("API_KEY", None)
    if key:
        env["API_KEY"] = key
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "handler.main"], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # readiness poll, bounded; nothing asserts on time
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"handler.main did not serve:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def servers(tiny_int8: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("docs-serve")
    started: list[subprocess.Popen[bytes]] = []
    try:
        keyed, keyed_url = serve(tiny_int8, logs / "keyed.log", API_KEY)
        started.append(keyed)
        open_, open_url = serve(tiny_int8, logs / "open.log", None)
        started.append(open_)
        yield {"": keyed_url, "auth off": open_url}
    finally:
        for proc in started:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory whose `.venv/bin/activate` is this interpreter's environment."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    return tmp_path


@pytest.mark.parametrize("example", RUN, ids=[e.id for e in RUN])
def test_example_runs(example: Example, servers: dict[str, str], workdir: Path) -> None:
    assert example.marker in servers, f"{example.id}: unknown marker {example.marker!r}"
    url = servers[example.marker]
    code = example.code.replace(README_URL, url)
    env = {**os.environ, "BASE": url, "API_KEY": API_KEY, "PYTHONPATH": str(ROOT)}
    if example.language == "python":
        command = [sys.executable, "-c", code]
    else:
        curl = shutil.which("curl")
        assert curl, "curl is needed to run the shell examples"
        # An example that already says -f keeps it (curl refuses both flags together).
        prelude = (
            "set -eo pipefail\n"
            "curl() {\n"
            '  for a in "$@"; do case "$a" in --fail*|-f*|-[!-]*f*) '
            f'"{curl}" "$@"; return; esac; done\n'
            f'  "{curl}" --fail-with-body "$@"\n'
            "}\n"
        )
        command = ["bash", "-c", prelude + code]
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (
        f"{example.id} ({example.language}) failed with {done.returncode}:\n{code}\n"
        f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    )


def test_not_run_examples_say_why() -> None:
    """Each skipped block names its reason; the list is printed for the record (pytest -s)."""
    for e in NOT_RUN:
        reason = e.marker.removeprefix("not run:").strip()
        assert reason, f"{e.id}: a not-run marker needs a reason"
        print(f"not run: {e.id} ({e.language}): {reason}")
    print(f"{len(RUN)} examples run, {len(NOT_RUN)} marked not run, {len(ALL)} in all")
    # The reference's own examples run: at least one per dialect in the README and in docs/api.md.
    for page in ("README.md", "docs/api.md"):
        assert any(e.page == page for e in RUN), f"{page} has no example that runs"
