"""`python -m model_build`: build a servable ONNX artifact (model.onnx, model.onnx_data,
tokenizer.json, manifest.json) from a hub repo or a local directory.

Exit codes: 0 built; 1 the fidelity gate refused the model (nothing written to --out);
2 usage or source error (one line on stderr); 3 an unexpected error (a bug: traceback shown).
Progress goes to stderr; the artifact directory is printed on stdout when the build succeeds.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from handler.engine.manifest import Thresholds
from model_build.errors import EXIT_INTERNAL, EXIT_OK, FAULTS, BuildError, GateFailedError
from model_build.source import BGE_M3_REPO, PINNED_REVISION

_T = Thresholds()

EPILOG = f"""\
examples:
  python -m model_build --out artifacts/bge-m3-int8
  python -m model_build --source /models/bge-m3 --precision fp32 --out artifacts/bge-m3-fp32
  python -m model_build --source sentence-transformers/all-MiniLM-L6-v2 --recipe dense \\
      --precision int8 --out artifacts/minilm-int8

{BGE_M3_REPO} defaults to revision {PINNED_REVISION}, whose known files are sha256-checked.
Without network access, copy the repo's files into a directory and pass --source DIR.
"""


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not within [0, 1]")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value} is too small")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_build",
        description="Build an ONNX embedding artifact (BGE-M3 dense+sparse+ColBERT, or a "
        "sentence-transformers dense model) with a fidelity gate against fp32 PyTorch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--source",
        default=BGE_M3_REPO,
        help=f"hub repo id or local directory in the hub's layout (default {BGE_M3_REPO})",
    )
    parser.add_argument(
        "--revision",
        help=f"hub revision (default: {PINNED_REVISION[:12]}… for {BGE_M3_REPO}, else main)",
    )
    parser.add_argument("--recipe", choices=("bge-m3", "dense"), default="bge-m3")
    parser.add_argument("--precision", choices=("int8", "fp16", "fp32"), default="int8")
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    parser.add_argument(
        "--model-id",
        help="served model name (default: bge-m3 for the bge-m3 recipe, else the source's last "
        "path component, lowercased)",
    )
    parser.add_argument(
        "--alias",
        action="append",
        dest="aliases",
        metavar="NAME",
        help="another name the model answers to (repeatable; default: the hub repo id)",
    )
    parser.add_argument(
        "--max-length",
        type=_positive_int,
        help="longest input in tokens, specials included (default: 8192 for bge-m3; for dense, "
        "sentence_bert_config.json max_seq_length, else the position table)",
    )
    gate = parser.add_argument_group("fidelity gate (built ONNX vs fp32 PyTorch)")
    gate.add_argument(
        "--min-dense-cosine",
        type=_unit_interval,
        default=_T.min_dense_cosine,
        help="lowest dense cosine of any text (default %(default)s)",
    )
    gate.add_argument(
        "--min-dense-mean",
        type=_unit_interval,
        default=_T.min_dense_mean,
        help="mean dense cosine (default %(default)s)",
    )
    gate.add_argument(
        "--max-lexical-error",
        type=_unit_interval,
        default=_T.max_lexical_error,
        help="largest error of the lexical match scores over query-passage pairs, relative to "
        "their sum (bge-m3; default %(default)s)",
    )
    gate.add_argument(
        "--min-sparse-overlap",
        type=_unit_interval,
        default=_T.min_sparse_overlap,
        help="mean weighted overlap of each text's heaviest sparse tokens "
        "(bge-m3; default %(default)s)",
    )
    gate.add_argument(
        "--min-colbert-mean",
        type=_unit_interval,
        default=_T.min_colbert_mean,
        help="mean ColBERT row cosine (bge-m3; default %(default)s)",
    )
    gate.add_argument(
        "--validation-set",
        type=Path,
        help="JSONL of {lang, text} (default model_build/data/validation.jsonl)",
    )
    quant = parser.add_argument_group("int8")
    quant.add_argument(
        "--calibration-set",
        type=Path,
        help="JSONL of {lang, text} for SmoothQuant (default model_build/data/calibration.jsonl)",
    )
    quant.add_argument(
        "--smoothquant-alpha",
        type=_unit_interval,
        default=0.5,
        help="SmoothQuant migration strength (default %(default)s)",
    )
    quant.add_argument("--no-smoothquant", action="store_true", help="quantize without SmoothQuant")
    quant.add_argument(
        "--int8-weights",
        choices=("s8", "u8"),
        default="s8",
        help="s8: fastest on x86 with VNNI and on arm64; u8: exact on x86 without VNNI (AVX2, "
        "AVX-512F), about half the matmul speed where VNNI exists (default %(default)s)",
    )
    parser.add_argument(
        "--no-optimize-graph",
        action="store_true",
        help="ship the graph as exported: the server optimizes it at every start (by default "
        "CPU precisions ship the graph onnxruntime optimized at build time)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it exists and is not empty"
    )
    parser.add_argument("--cache-dir", type=Path, help="hub download cache (default HF_HUB_CACHE)")
    parser.add_argument("--opset", type=int, default=17, help=argparse.SUPPRESS)
    parser.add_argument("--keep-staging", action="store_true", help=argparse.SUPPRESS)
    # Test hook: deliberately corrupt the int8 weight scales so that the gate must refuse.
    parser.add_argument("--fault-inject", choices=FAULTS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    # Imported after parsing so that --help and usage errors are instant (no torch import).
    from model_build.build import BuildOptions, build

    options = BuildOptions(
        out=args.out,
        source=args.source,
        revision=args.revision,
        recipe=args.recipe,
        precision=args.precision,
        model_id=args.model_id,
        aliases=args.aliases,
        max_length=args.max_length,
        thresholds=Thresholds(
            min_dense_cosine=args.min_dense_cosine,
            min_dense_mean=args.min_dense_mean,
            max_lexical_error=args.max_lexical_error,
            min_sparse_overlap=args.min_sparse_overlap,
            min_colbert_mean=args.min_colbert_mean,
        ),
        validation_set=args.validation_set,
        calibration_set=args.calibration_set,
        smoothquant_alpha=None if args.no_smoothquant else args.smoothquant_alpha,
        force=args.force,
        cache_dir=args.cache_dir,
        opset=args.opset,
        fault_inject=args.fault_inject,
        int8_weights=args.int8_weights,
        keep_staging=args.keep_staging,
        optimize_graph=not args.no_optimize_graph,
    )
    try:
        report = build(options)
    except BuildError as exc:
        print(f"model_build: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except GateFailedError as exc:
        print(f"model_build: {exc}; nothing was written to {args.out}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("model_build: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("model_build: internal error (a bug; the traceback is above)", file=sys.stderr)
        return EXIT_INTERNAL
    print(report.out)
    return EXIT_OK
