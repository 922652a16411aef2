"""`python -m bench.gpu` on a machine without a GPU: it refuses to pass CPU figures off as GPU ones,
and with --allow-cpu it runs every stage but the server on the tiny model (the real GPU figures
come from a machine with CUDA; see bench/results/*-gpu-*.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu


@pytest.mark.slow
def test_refuses_cpu_figures_unless_asked(tiny_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    assert gpu.main([str(tiny_fp32), "--no-concurrency", "--out", str(out)]) == 1
    assert not out.exists()

    assert gpu.main([str(tiny_fp32), "--allow-cpu", "--no-concurrency", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["load"]["device"] == "cpu"
    assert result["agreement"]["dense_cosine_min"] > 0.9999
    assert set(result["throughput_all_heads"]) == {"32x128", "8x512", "64x512"}
    assert result["long_text"]["tokens"] == gpu.LONG_TOKENS
