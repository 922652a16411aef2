"""The onnxruntime session: execution provider, threads and options, chosen explicitly."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Literal

import onnxruntime as ort

from handler.engine.manifest import OptimizedGraph

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
_explained: set[str] = set()  # fallback reasons already logged: one line per reason, not per load

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
            return ["CUDAExecutionProvider", CPU_PROVIDER]
        log.warning(
            "DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider "
            "(available: %s); falling back to CPU",
            ", ".join(ort.get_available_providers()),
        )
    return [CPU_PROVIDER]


def create_session(
    model_file: Path, *, device: Device, threads: int, optimized: OptimizedGraph | None = None
) -> ort.InferenceSession:
    """`optimized`: the manifest's record of a graph onnxruntime already optimized at build time
    (None for a graph as exported)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One request's batches run one after another; parallelism lives inside each op.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = providers_for(device)
    on_cpu = providers[0] == CPU_PROVIDER
    level, why_not = optimization_level(optimized, providers[0])
    if why_not is not None and why_not not in _explained:
        _explained.add(why_not)
        log.info("%s: optimizing the graph at load: %s", model_file.parent.name, why_not)
    options.graph_optimization_level = level
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(model_file),
        sess_options=options,
        providers=providers,
        disabled_optimizers=cpu_disabled_optimizers() if on_cpu else [],
    )
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        log.warning("the CUDA execution provider could not start; running on CPU")
    return session


def optimization_level(
    optimized: OptimizedGraph | None, provider: str
) -> tuple[ort.GraphOptimizationLevel, str | None]:
    """The level to load a graph at, and why a graph optimized at build time is optimized again.

    A graph onnxruntime saved at the extended level has its fusions and constant folding done.
    What ORT_ENABLE_ALL adds is the layout level, which changes nothing in these graphs (saved at
    ORT_ENABLE_ALL the full-size int8 model has the very same nodes), so the saved graph loads
    with the passes off: its session started in 374-420 ms against 478-487 ms (full-size int8,
    1 thread), the same outputs bit for bit and the same query time. ORT_DISABLE_ALL rather than
    ORT_ENABLE_BASIC: the basic passes find nothing left to do and cost time (tiny fixture: 9.5 ms
    off, 11.4 ms basic, 18.8 ms for the graph as exported at ORT_ENABLE_ALL).
    The saved graph holds one provider's fused ops as one onnxruntime version made them: another
    provider or version optimizes at load, as for a graph that was not saved."""
    if optimized is None:
        return ort.GraphOptimizationLevel.ORT_ENABLE_ALL, None
    if provider != optimized.provider:
        why = f"the graph was optimized for {optimized.provider}, this session runs {provider}"
    elif optimized.onnxruntime != ort.__version__:
        why = (
            f"the graph was optimized by onnxruntime {optimized.onnxruntime}, "
            f"this is {ort.__version__}"
        )
    elif list(optimized.disabled_optimizers) != cpu_disabled_optimizers():
        why = (
            f"the graph was optimized without {list(optimized.disabled_optimizers)}, "
            f"this engine disables {cpu_disabled_optimizers()}"
        )
    else:
        return ort.GraphOptimizationLevel.ORT_DISABLE_ALL, None
    return ort.GraphOptimizationLevel.ORT_ENABLE_ALL, why


def cpu_disabled_optimizers() -> list[str]:
    """onnxruntime fusions that make the CPU slower. Its CPU SkipLayerNormalization kernel took
    10.6 ms on 32 x 128 x 1024 floats where Add + LayerNormalization take 2.1 ms (2 threads,
    AVX-512); unfused, the full-size int8 model ran 32 x 128 tokens about 8% faster."""
    return ["SkipLayerNormFusion"]


def session_device(session: ort.InferenceSession) -> Device:
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
