"""Stage optimize: the graph onnxruntime makes of the exported one, saved in its place.

Most of a session's start is onnxruntime optimizing the graph (fusions, constant folding). For the
CPU provider the build does it once, at ORT_ENABLE_EXTENDED: the level below the layout
transformers, whose choices depend on the CPU it runs on (onnxruntime's own advice for graphs
optimized offline). The engine then loads the saved graph with its optimizations off; the
manifest's `onnx.optimized` section says which onnxruntime, provider and disabled fusions made it,
so that any other combination optimizes at load as before.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from handler.engine.manifest import OptimizedGraph
from handler.engine.session import CPU_PROVIDER, cpu_disabled_optimizers
from model_build.progress import Progress

# onnxruntime_session_options_config_keys.h: where the optimized graph's initializers go.
EXTERNAL_FILE_KEY = "session.optimized_model_external_initializers_file_name"
EXTERNAL_MIN_SIZE_KEY = "session.optimized_model_external_initializers_min_size_in_bytes"
DISABLE_PREPACKING_KEY = "session.disable_prepacking"
# As the exporter's threshold (recipes.save_with_external_data): small constants stay inline.
INLINE_BELOW_BYTES = 1024


def optimize_graph(model_file: Path, external_data: str, progress: Progress) -> OptimizedGraph:
    """Replace `model_file` and its external data file with onnxruntime's extended optimization
    of them. The new files are written to a directory beside them (same filesystem) and renamed
    over the old ones, so the artifact never holds two copies of the weights."""
    import onnxruntime as ort

    directory = model_file.parent
    disabled = cpu_disabled_optimizers()
    before = _sizes(directory, model_file.name, external_data)
    with tempfile.TemporaryDirectory(prefix=".optimize-", dir=directory) as tmp:
        target = Path(tmp) / model_file.name
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(target)
        options.add_session_config_entry(EXTERNAL_FILE_KEY, external_data)
        options.add_session_config_entry(EXTERNAL_MIN_SIZE_KEY, str(INLINE_BELOW_BYTES))
        # The session only writes the graph: packing its weights for this CPU would be wasted.
        options.add_session_config_entry(DISABLE_PREPACKING_KEY, "1")
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(model_file), options, providers=[CPU_PROVIDER], disabled_optimizers=disabled
        )
        del session
        written = Path(tmp) / external_data
        if not written.is_file():
            raise RuntimeError(f"onnxruntime wrote no {external_data} for {model_file}")
        os.replace(written, directory / external_data)
        os.replace(target, model_file)
    after = _sizes(directory, model_file.name, external_data)
    progress.log(
        "optimize",
        f"onnxruntime {ort.__version__} {CPU_PROVIDER} extended, disabled {disabled}: "
        f"graph {before[0]:,} -> {after[0]:,} bytes, data {before[1]:,} -> {after[1]:,} bytes",
    )
    return OptimizedGraph(
        level="extended",
        onnxruntime=ort.__version__,
        provider=CPU_PROVIDER,
        disabled_optimizers=tuple(disabled),
    )


def _sizes(directory: Path, *names: str) -> tuple[int, ...]:
    return tuple((directory / name).stat().st_size for name in names)
