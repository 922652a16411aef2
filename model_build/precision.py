"""Stage 4, precision: fp32 as exported, fp16 by onnxruntime's float16 converter, int8 by the
quantizer in model_build/quantize.py (and SmoothQuant on the torch encoder before export).

Every variant ends as `model.onnx` + `model.onnx_data` in the staging directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_build.errors import FAULTS, INT8_FAULTS, BuildError
from model_build.progress import Progress
from model_build.recipes import EXTERNAL_DATA, load_with_shapes, save_with_external_data

if TYPE_CHECKING:
    import torch

__all__ = [
    "FAULTS",
    "INT8_FAULTS",
    "move_onnx",
    "normalize_external_data",
    "smoothquant",
    "to_fp16",
    "to_int8",
]


def move_onnx(src: Path, dst: Path) -> None:
    """Move a graph and its external data; the data file name stays `model.onnx_data`."""
    shutil.move(str(src), str(dst))
    shutil.move(str(src.parent / EXTERNAL_DATA), str(dst.parent / EXTERNAL_DATA))


def to_fp16(src: Path, dst: Path, progress: Progress) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The converter uses these shapes instead of inferring its own (which fails above 2 GB).
    proto = load_with_shapes(src)
    progress.log("quantize", "converting weights and activations to float16 (inputs/outputs stay)")
    converted = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    save_with_external_data(converted, dst)
    return {
        "method": "fp16",
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": True,
        "note": "graph inputs and outputs stay int64/float32; everything else is float16",
    }


def to_int8(
    src: Path, dst: Path, *, fault_inject: str | None, weights: str, progress: Progress
) -> dict[str, Any]:
    try:
        from model_build.quantize import quantize_int8
    except ImportError as exc:
        raise BuildError(
            f"--precision int8 needs the quantizer (model_build/quantize.py): {exc}"
        ) from exc
    progress.log("quantize", "int8 quantization (model_build.quantize.quantize_int8)")
    report = quantize_int8(src, dst, fault_inject=fault_inject, weights=weights)
    normalize_external_data(dst)
    return dict(report)


def normalize_external_data(path: Path) -> None:
    """Make sure all weights live in `model.onnx_data` beside `path` (re-save if the quantizer
    chose another layout: several files, another name, or weights inside the protobuf)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    locations: set[str] = set()
    big_inline = False
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
        elif len(tensor.raw_data) > 1024:
            big_inline = True
    if locations == {EXTERNAL_DATA} and not big_inline:
        return
    old_files = [path.parent / loc for loc in locations if loc != EXTERNAL_DATA]
    onnx.load_external_data_for_model(proto, str(path.parent))
    save_with_external_data(proto, path)
    for old in old_files:
        if old.exists():
            old.unlink()


def smoothquant(
    encoder: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    alpha: float,
    progress: Progress,
) -> dict[str, Any]:
    import torch

    try:
        from model_build.smoothquant import apply_smoothquant, collect_activation_stats
    except ImportError as exc:
        raise BuildError(
            "--precision int8 with SmoothQuant needs model_build/smoothquant.py "
            f"({exc}); pass --no-smoothquant to quantize without it"
        ) from exc
    progress.log("quantize", f"SmoothQuant: activation statistics over {len(batches)} batches")
    with torch.no_grad():
        stats = collect_activation_stats(encoder, batches)
        progress.log("quantize", f"SmoothQuant: smoothing with alpha {alpha}")
        report = apply_smoothquant(encoder, stats, alpha=alpha)
    return dict(report)
