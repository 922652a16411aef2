"""Stage 6, manifest: what the runtime needs to serve the artifact, written through
handler.engine.manifest.write_manifest (the one schema), plus world-readable permissions (the Lambda
runtime user is not root) and the move from the staging directory into --out.
"""

from __future__ import annotations

import os
import shutil
import stat
from importlib import metadata
from pathlib import Path

from handler.engine.manifest import MANIFEST_NAME, FileEntry, file_entry

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
TOOLS = ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "huggingface_hub")
_DIST_NAMES = {"huggingface_hub": "huggingface-hub"}


def tool_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for tool in TOOLS:
        try:
            versions[tool] = metadata.version(_DIST_NAMES.get(tool, tool))
        except metadata.PackageNotFoundError:
            versions[tool] = "not installed"
    return versions


def file_entries(directory: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file in the artifact except the manifest itself."""
    return {
        path.relative_to(directory).as_posix(): file_entry(path)
        for path in sorted(p for p in directory.rglob("*") if p.is_file())
        if path.name != MANIFEST_NAME or path.parent != directory
    }


def onnx_opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError(f"{path}: no default-domain opset")


def make_world_readable(directory: Path) -> None:
    """Files 0644, directories 0755."""
    for path in [directory, *directory.rglob("*")]:
        mode = 0o755 if path.is_dir() else 0o644
        os.chmod(path, mode)


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def move_into_place(staging: Path, out: Path) -> None:
    """Replace `out` (absent, empty, or allowed by --force) with `staging` (same filesystem, so
    the final step is a rename: a reader never sees a half-written artifact)."""
    old: Path | None = None
    if out.is_dir():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    elif out.exists():
        out.unlink()
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    out.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
