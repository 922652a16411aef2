"""The onnxruntime session: execution provider, threads and options, chosen explicitly."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Literal

import onnxruntime as ort

log = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(cpu_limit: int | None = None) -> int:
    """onnxruntime ignores OMP_NUM_THREADS, so we pick: the cores this process may use, and no
    more than `cpu_limit`, the vCPUs the platform really grants (a Lambda function sees every
    core of its host but runs on what its memory size buys; more threads than that contend)."""
    cores = available_cores()
    return max(1, min(cores, cpu_limit or cores))


def x86_without_vnni(cpuinfo: str | None = None) -> bool:
    """True on an x86 CPU without AVX-512 VNNI or AVX-VNNI. There MLAS multiplies uint8 by int8
    through VPMADDUBSW, whose int16 pair sums saturate: int8 models built with s8 weights lose
    accuracy (measured: dense cosine min 0.983 instead of 0.995). Build with --int8-weights u8."""
    if platform.machine().lower() not in {"x86_64", "amd64", "i686", "i386"}:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False  # unknown: say nothing rather than cry wolf
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return not ({"avx512_vnni", "avx_vnni"} & set(flags.split()))


def providers_for(device: Device) -> list[str]:
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning(
            "DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider "
            "(available: %s); falling back to CPU",
            ", ".join(ort.get_available_providers()),
        )
    return ["CPUExecutionProvider"]


def create_session(model_file: Path, *, device: Device, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One request's batches run one after another; parallelism lives inside each op.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    providers = providers_for(device)
    on_cpu = providers[0] == "CPUExecutionProvider"
    session = ort.InferenceSession(
        str(model_file),
        sess_options=options,
        providers=providers,
        disabled_optimizers=cpu_disabled_optimizers() if on_cpu else [],
    )
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        log.warning("the CUDA execution provider could not start; running on CPU")
    return session


def cpu_disabled_optimizers() -> list[str]:
    """onnxruntime fusions that make the CPU slower. Its CPU SkipLayerNormalization kernel took
    10.6 ms on 32 x 128 x 1024 floats where Add + LayerNormalization take 2.1 ms (2 threads,
    AVX-512); unfused, the full-size int8 model ran 32 x 128 tokens about 8% faster."""
    return ["SkipLayerNormFusion"]


def session_device(session: ort.InferenceSession) -> Device:
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
