"""The plain-onnxruntime baselines, made from the same weights as our builds:

- `plain fp32`: a straight `torch.onnx.export` (TorchScript exporter, opset 17, no graph
  rewriting) of the XLM-R backbone with BGE-M3's three heads, the outputs our engine reads
  (`dense` L2-normalised CLS, `sparse` relu(sparse_linear) per token, `colbert` masked and
  row-normalised, `<s>` dropped);
- `plain int8`: `onnxruntime.quantization.quantize_dynamic` with its default settings on that
  export.

Both directories get a manifest.json, so our engine can load them too. Run in its own process
(torch is imported here, never in the benchmark's parent):

    python -m bench.export --source FIXTURE_DIR --out DIR [--quantize-from FP32_DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import say
from handler.engine.manifest import Precision, load_manifest

OPSET = 17
DATA_FILE = "model.onnx_data"
OUTPUTS = ("dense", "sparse", "colbert")
SPECIAL_TOKENS = {"cls": 0, "pad": 1, "sep": 2, "unk": 3}


def load_backbone(source: Path, attn_implementation: str | None = None) -> Any:
    """The source's XLM-R backbone with its weights (no pooler), in eval mode. The attention is
    transformers' default unless `attn_implementation` says otherwise."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config_dict = json.loads((source / "config.json").read_text())
    config = XLMRobertaConfig(**{k: v for k, v in config_dict.items() if not k.startswith("_")})
    if attn_implementation:
        config._attn_implementation = attn_implementation
    backbone = XLMRobertaModel(config, add_pooling_layer=False)
    state = torch.load(source / "pytorch_model.bin", map_location="cpu", weights_only=True)
    missing, _unexpected = backbone.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("pooler.")]:
        raise SystemExit(f"{source}: weights missing from pytorch_model.bin: {missing[:5]}")
    backbone.eval()  # type: ignore[no-untyped-call]
    return backbone


def save_in_one_data_file(staging: Path, out: Path) -> None:
    """staging/model.onnx, as the exporter wrote it, into out/model.onnx plus one weights file
    (the exporter scatters the tensors of a >2 GB model over many files); staging is removed."""
    import onnx

    graph = onnx.load(str(staging / "model.onnx"), load_external_data=True)
    onnx.save_model(
        graph,
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    del graph
    shutil.rmtree(staging)


def export_plain(source: Path, out: Path) -> None:
    config_dict = json.loads((source / "config.json").read_text())
    backbone = load_backbone(source)
    hidden = int(config_dict["hidden_size"])
    colbert = torch.nn.Linear(hidden, hidden)
    colbert.load_state_dict(torch.load(source / "colbert_linear.pt", weights_only=True))
    sparse = torch.nn.Linear(hidden, 1)
    sparse.load_state_dict(torch.load(source / "sparse_linear.pt", weights_only=True))
    model = M3(backbone, colbert, sparse).eval()

    # A padded example, so the traced graph keeps the attention-mask path (an all-ones mask
    # lets transformers skip it, and the trace would freeze that choice).
    ids = torch.tensor([[0, 581, 7986, 83, 10, 2], [0, 35378, 2, 1, 1, 1]], dtype=torch.int64)
    mask = (ids != SPECIAL_TOKENS["pad"]).to(torch.int64)
    mask[0, :] = 1
    out.mkdir(parents=True, exist_ok=True)
    staging = out / "staging"
    staging.mkdir(exist_ok=True)
    with torch.no_grad():
        expected = [t.numpy() for t in model(ids, mask)]
        torch.onnx.export(
            model,
            (ids, mask),
            str(staging / "model.onnx"),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input_ids", "attention_mask"],
            output_names=list(OUTPUTS),
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "dense": {0: "batch"},
                "sparse": {0: "batch", 1: "sequence"},
                "colbert": {0: "batch", 1: "sequence_minus_1"},
            },
        )
    del model, backbone
    save_in_one_data_file(staging, out)
    _check(out, ids.numpy(), mask.numpy(), expected)
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    _write_manifest(out, config_dict, "fp32", "plain torch.onnx.export (TorchScript), opset 17")


class M3(torch.nn.Module):
    """The backbone and BGE-M3's heads, as FlagEmbedding's BGEM3FlagModel computes them."""

    def __init__(
        self, backbone: torch.nn.Module, colbert: torch.nn.Linear, sparse: torch.nn.Linear
    ) -> None:
        super().__init__()
        self.backbone, self.colbert, self.sparse = backbone, colbert, sparse

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]
        dense = torch.nn.functional.normalize(h[:, 0], dim=-1)
        weights = torch.relu(self.sparse(h)).squeeze(-1)
        col = self.colbert(h[:, 1:]) * attention_mask[:, 1:, None].to(h.dtype)
        col = torch.nn.functional.normalize(col, dim=-1)
        return dense, weights, col


def _check(out: Path, ids: Any, mask: Any, expected: list[Any]) -> None:
    """The export gives torch's outputs on a padded batch (a frozen mask path would not)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), {"input_ids": ids, "attention_mask": mask})
    for name, g, e in zip(OUTPUTS, got, expected, strict=True):
        diff = float(np.max(np.abs(np.asarray(g) - e)))
        if diff > 1e-3:
            raise SystemExit(f"plain export: output {name} differs from torch by {diff:.2e}")


def quantize_plain(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    out.mkdir(parents=True, exist_ok=True)
    # Default settings on purpose: this is the baseline anyone gets. External data only because
    # a full-size graph does not fit one protobuf.
    quantize_dynamic(fp32 / "model.onnx", out / "model.onnx", use_external_data_format=True)
    shutil.copyfile(fp32 / "tokenizer.json", out / "tokenizer.json")
    config = load_manifest(fp32).notes["bench_config"]
    _write_manifest(out, config, "int8", "onnxruntime quantize_dynamic, default settings")


def _write_manifest(out: Path, config: dict[str, Any], precision: Precision, how: str) -> None:
    import onnx

    from handler.engine.manifest import (
        Manifest,
        OnnxSection,
        TensorSpec,
        TokenizerSection,
        file_entry,
        write_manifest,
    )

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    outputs = {o.name for o in graph.graph.output}
    if outputs != set(OUTPUTS):
        raise SystemExit(f"{out}: unexpected outputs {sorted(outputs)}")
    hidden = int(config["hidden_size"])
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
    write_manifest(
        out,
        Manifest(
            model_id="bge-m3",
            recipe="bge-m3",
            precision=precision,
            dims=hidden,
            max_length=int(config["max_position_embeddings"]) - 2,
            vocab_size=int(config["vocab_size"]),
            pooling="cls",
            normalize=True,
            special_tokens=SPECIAL_TOKENS,
            onnx=OnnxSection(
                file="model.onnx",
                inputs=tuple(
                    TensorSpec(name=n, dtype="int64", shape=("batch", "sequence"))
                    for n in ("input_ids", "attention_mask")
                ),
                outputs=(
                    TensorSpec(name="dense", dtype="float32", shape=("batch", hidden)),
                    TensorSpec(name="sparse", dtype="float32", shape=("batch", "sequence")),
                    TensorSpec(
                        name="colbert",
                        dtype="float32",
                        shape=("batch", "sequence_minus_1", hidden),
                    ),
                ),
            ),
            tokenizer=TokenizerSection(file="tokenizer.json"),
            files={name: file_entry(out / name) for name in files},
            notes={"bench_baseline": how, "bench_config": config},
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__)
    parser.add_argument("--source", type=Path, help="a BGE-M3-layout model directory")
    parser.add_argument("--quantize-from", type=Path, help="a plain fp32 export to quantize")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.quantize_from:
        say("export", f"quantize_dynamic {args.quantize_from} -> {args.out}")
        quantize_plain(args.quantize_from, args.out)
    elif args.source:
        say("export", f"torch.onnx.export {args.source} -> {args.out}")
        export_plain(args.source, args.out)
    else:
        parser.error("give --source or --quantize-from")
    say("export", f"{args.out} done in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
