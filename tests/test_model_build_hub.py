"""The hub path of `python -m model_build`, against a fake hub on 127.0.0.1.

The fake implements only what `huggingface_hub.snapshot_download` (2.x) calls for a model repo:
  GET  /api/models/{repo}/revision/{rev}        -> {"id", "sha"} (model_info: revision -> commit)
  GET  /api/models/{repo}/tree/{rev}?recursive   -> the file list (path, size, oid, lfs)
  HEAD /{repo}/resolve/{rev}/{path}              -> X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{path}              -> the bytes
and serves the tiny BGE-M3-layout fixture. HF_ENDPOINT points the build's subprocess at it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest

from handler.engine.manifest import load_manifest, verify_files
from model_build.source import BGE_M3_REPO, PINNED_REVISION, known_digests

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_REPO = "test-org/bge-m3-tiny"
TEST_COMMIT = "1" * 40
# Present in the fake repo but needed by no recipe: must never be requested.
UNNEEDED = {"onnx/model.onnx": b"not needed" * 100, "README.md": b"# tiny\n"}


@dataclass
class FakeRepo:
    commit: str
    files: dict[str, bytes]
    refs: set[str] = field(default_factory=set)  # revision names that resolve to `commit`


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloaded(self) -> set[str]:
        """Paths whose bytes were fetched (GET on resolve)."""
        out = set()
        for method, path in self.requests:
            match = re.match(r"^/[^/]+/[^/]+/resolve/[^/]+/(.+)$", path)
            if method == "GET" and match:
                out.add(unquote(match.group(1)))
        return out

    def _lookup(self, repo: str, revision: str) -> FakeRepo | None:
        found = self.repos.get(repo)
        if found is None:
            return None
        if revision == found.commit or revision in found.refs:
            return found
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _send(
                self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
                self._send(
                    status,
                    json.dumps(data).encode(),
                    {"Content-Type": "application/json", **(headers or {})},
                )

            def _not_found(self, code: str) -> None:
                self._json(404, {"error": code}, {"X-Error-Code": code})

            def _route(self) -> None:
                path = urlparse(self.path).path
                hub.requests.append((self.command, path))
                info = re.match(r"^/api/models/([^/]+/[^/]+)/revision/([^/]+)$", path)
                tree = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)$", path)
                resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if info and self.command == "GET":
                    repo_id, revision = info.group(1), unquote(info.group(2))
                    repo = hub._lookup(repo_id, revision)
                    if repo_id not in hub.repos:
                        return self._not_found("RepoNotFound")
                    if repo is None:
                        return self._not_found("RevisionNotFound")
                    return self._json(200, {"id": repo_id, "sha": repo.commit, "private": False})
                if tree and self.command == "GET":
                    repo = hub._lookup(tree.group(1), unquote(tree.group(2)))
                    if repo is None:
                        return self._not_found("RevisionNotFound")
                    listing = []
                    for name, data in sorted(repo.files.items()):
                        entry: dict[str, Any] = {
                            "type": "file",
                            "path": name,
                            "size": len(data),
                            "oid": hashlib.sha1(data).hexdigest(),
                        }
                        if len(data) > 1000:
                            entry["lfs"] = {
                                "oid": hashlib.sha256(data).hexdigest(),
                                "size": len(data),
                                "pointerSize": 134,
                            }
                        listing.append(entry)
                    return self._json(200, listing)
                if resolve and self.command in ("GET", "HEAD"):
                    repo = hub._lookup(resolve.group(1), unquote(resolve.group(2)))
                    name = unquote(resolve.group(3))
                    if repo is None:
                        return self._not_found("RevisionNotFound")
                    if name not in repo.files:
                        return self._send(
                            404,
                            b"",
                            {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit},
                        )
                    data = repo.files[name]
                    return self._send(
                        200,
                        data,
                        {
                            "X-Repo-Commit": repo.commit,
                            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                            "Content-Type": "application/octet-stream",
                        },
                    )
                return self._not_found("NotFound")

            def do_GET(self) -> None:
                self._route()

            def do_HEAD(self) -> None:
                self._route()

        return Handler


def _repo_files(source: Path) -> dict[str, bytes]:
    files = {
        p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()
    }
    return {**files, **UNNEEDED}


@pytest.fixture(scope="module")
def fake_hub(bge_m3_source: Path) -> Iterator[FakeHub]:
    hub = FakeHub()
    files = _repo_files(bge_m3_source)
    hub.repos[TEST_REPO] = FakeRepo(commit=TEST_COMMIT, files=files, refs={"main"})
    # The real repo id at the pinned commit, but with the shrunk fixture's config.json.
    hub.repos[BGE_M3_REPO] = FakeRepo(commit=PINNED_REVISION, files=files, refs={"main"})
    hub.start()
    yield hub
    hub.stop()


def run_hub_build(args: list[str], endpoint: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_TOKEN": "",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("HF_HUB_CACHE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-m", "model_build", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_download_at_non_pinned_revision_builds(fake_hub: FakeHub, tmp_path: Path) -> None:
    # GIVEN a hub repo other than BAAI/bge-m3 (default revision: main)
    out = tmp_path / "artifact"
    proc = run_hub_build(
        [
            "--source", TEST_REPO,
            "--recipe", "bge-m3",
            "--precision", "fp32",
            "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out),
        ],
        fake_hub.endpoint,
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # THEN the files came from the fake hub, only those the recipe needs
    downloaded = fake_hub.downloaded()
    assert {"config.json", "pytorch_model.bin", "tokenizer.json", "colbert_linear.pt"} <= downloaded
    assert not downloaded & set(UNNEEDED), downloaded
    assert not any(p.startswith("1_Pooling") for p in downloaded)  # bge-m3 does not need it
    # AND the manifest records the repo and the commit the revision resolved to
    manifest = load_manifest(out)
    verify_files(out, manifest)
    source = manifest.source
    assert source.repo == TEST_REPO
    assert source.revision == TEST_COMMIT
    assert source.requested_revision == "main"
    assert source.local_dir is None
    assert manifest.aliases == (TEST_REPO,)
    assert manifest.validation is not None and manifest.validation.passed is True
    assert manifest.validation.real_model is not None
    assert manifest.validation.real_model.skipped is not None  # not BAAI/bge-m3 itself
    assert str(out) in proc.stdout


def test_pinned_revision_checks_sha256(fake_hub: FakeHub, tmp_path: Path) -> None:
    # GIVEN BAAI/bge-m3 at the pinned revision serving the shrunk fixture config.json
    assert "config.json" in known_digests()
    out = tmp_path / "artifact"
    proc = run_hub_build(
        ["--precision", "fp32", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        fake_hub.endpoint,
        tmp_path,
    )
    # THEN the build stops with a usage/source error that names config.json
    assert proc.returncode == 2, proc.stderr
    assert "sha256 mismatch" in proc.stderr
    assert "config.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_unreachable_hub_says_use_local_dir(tmp_path: Path) -> None:
    # GIVEN an endpoint on a closed loopback port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "artifact"
    proc = run_hub_build(
        ["--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        f"http://127.0.0.1:{port}",
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "hub unreachable" in proc.stderr
    assert "--source /path/to/dir" in proc.stderr
    assert "pytorch_model.bin" in proc.stderr  # the file list to put there
    assert "Traceback" not in proc.stderr
    assert not out.exists()
