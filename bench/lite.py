"""bge-m3-lite 0.6.2, the accurate public peer the targets compare with, built by its own code from
the same random weights as every other engine.

bge-m3-lite starts from the Hub's ONNX export of BAAI/bge-m3 (`model.onnx` + `model.onnx_data`, the
backbone with a `token_embeddings` output), the real `sentencepiece.bpe.model` and the two head
files, and it re-checks the pinned sha256 digests of the last three on every load. Here:

1. the source's backbone is exported in the Hub export's layout (TorchScript, eager attention, so
   that onnxruntime's optimizer fuses all 24 attention blocks, which bge-m3-lite's `fuse` demands);
2. `sentencepiece.bpe.model` is written from the source's tokenizer.json in sentencepiece's own id
   layout (`<unk> <s> </s>` first, every other id one below tokenizer.json's; bge-m3-lite adds the
   fairseq offset back) and must give tokenizer.json's ids on the validation and calibration texts;
3. bge-m3-lite's `fuse` and `quantize`, with its defaults (row-wise int8 with SmoothQuant α 0.5,
   calibrated on its bundled texts), make `model_int8.onnx`;
4. `accepted.json` records the size and sha256 of our tokenizer and head files: the worker hands
   them to `bge_m3_lite.hub` in place of the real files' digests (`accept_files`), offline.

Full size only: bge-m3-lite hard-codes hidden size 1024 and 16 heads. The quantize step holds
about 19 GiB while it calibrates, so the export (torch) runs in a child process of its own:

    python -m bench.lite --source FIXTURE_DIR --out DIR
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.common import Json, say

VERSION = "0.6.2"
SPM_FILE = "sentencepiece.bpe.model"
HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")
ACCEPTED_FILE = "accepted.json"
MODEL_FILE = "model_int8.onnx"
EXPORT_OPSET = 14  # what bge-m3-lite's `fuse` was made for (it raises older graphs to 13)
# tokenizer.json's first ids and sentencepiece's, for XLM-R: <s> <pad> </s> <unk> ... <mask>
HF_HEAD = ("<s>", "<pad>", "</s>", "<unk>")


def sentencepiece_model(tokenizer_json: Json) -> bytes:
    """XLM-R's tokenizer.json as the sentencepiece model it came from: the Unigram pieces with
    their scores, `<unk> <s> </s>` as ids 0-2 (so id = tokenizer.json id - 1), no `<pad>` or
    `<mask>` (bge-m3-lite adds both), and the nmt_nfkc charsmap of tokenizer.json's normalizer."""
    from sentencepiece import sentencepiece_model_pb2

    pb: Any = sentencepiece_model_pb2  # generated protobuf code, untyped
    model = tokenizer_json["model"]
    vocab = model["vocab"]
    if model["type"] != "Unigram" or tuple(p for p, _ in vocab[:4]) != HF_HEAD:
        raise ValueError("not an XLM-R Unigram tokenizer.json (<s> <pad> </s> <unk> first)")
    if vocab[-1][0] != "<mask>":
        raise ValueError("not an XLM-R tokenizer.json: the last piece is not <mask>")
    normalizers = tokenizer_json["normalizer"].get("normalizers", [tokenizer_json["normalizer"]])
    charsmaps = [n["precompiled_charsmap"] for n in normalizers if n["type"] == "Precompiled"]
    if len(charsmaps) != 1:
        raise ValueError("tokenizer.json has no Precompiled (nmt_nfkc) normalizer")

    proto = pb.ModelProto()
    piece_type = pb.ModelProto.SentencePiece
    for piece, kind in (
        ("<unk>", piece_type.UNKNOWN),
        ("<s>", piece_type.CONTROL),
        ("</s>", piece_type.CONTROL),
    ):
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    for piece, score in vocab[4:-1]:
        proto.pieces.add(piece=piece, score=score, type=piece_type.NORMAL)
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(proto.pieces)
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer = proto.normalizer_spec
    normalizer.name = "nmt_nfkc"
    normalizer.precompiled_charsmap = base64.b64decode(charsmaps[0])
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = True
    normalizer.escape_whitespaces = True
    return bytes(proto.SerializeToString())


def tokenizer_mismatches(spm_file: Path, tokenizer_file: Path, texts: Iterable[str]) -> list[str]:
    """The texts on which bge-m3-lite's tokenizer (on `spm_file`) and tokenizer.json disagree."""
    from bge_m3_lite.tokenizer import XLMRobertaTokenizer
    from tokenizers import Tokenizer

    lite = XLMRobertaTokenizer.from_file(spm_file)
    reference = Tokenizer.from_file(str(tokenizer_file))
    return [t for t in texts if lite.encode(t, max_length=1 << 20) != reference.encode(t).ids]


def probe_texts() -> list[str]:
    """model_build's validation and calibration texts: many languages and scripts."""
    data = Path(__file__).resolve().parent.parent / "model_build" / "data"
    texts: list[str] = []
    for name in ("validation.jsonl", "calibration.jsonl"):
        for line in (data / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line)["text"])
    return texts


def file_digest(path: Path) -> Json:
    return {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def accept_files(hub: Any, accepted: Json) -> None:
    """Make `bge_m3_lite.hub` accept our tokenizer and head files: the same entries with the size
    and digest of ours. It still re-checks every digest on load, as it does for the real files."""

    def ours(files: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            type(f)(f.name, f.remote_path, accepted[f.name]["size"], accepted[f.name]["sha256"])
            for f in files
        )

    hub.TOKENIZER_FILES = ours(hub.TOKENIZER_FILES)
    hub.HEAD_FILES = ours(hub.HEAD_FILES)


def export_backbone(source: Path, out: Path) -> None:
    """The source's backbone as the Hub's onnx/model.onnx: token_embeddings, eager attention."""
    import torch

    from bench.export import load_backbone, save_in_one_data_file

    backbone = load_backbone(source, attn_implementation="eager")

    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]

    ids = torch.tensor([[0, 581, 7986, 83, 10, 2], [0, 35378, 2, 1, 1, 1]], dtype=torch.int64)
    mask = (ids != 1).to(torch.int64)
    staging = out / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            Backbone().eval(),
            (ids, mask),
            str(staging / "model.onnx"),
            dynamo=False,
            opset_version=EXPORT_OPSET,
            input_names=["input_ids", "attention_mask"],
            output_names=["token_embeddings"],
            dynamic_axes={
                name: {0: "batch", 1: "sequence"}
                for name in ("input_ids", "attention_mask", "token_embeddings")
            },
        )
    save_in_one_data_file(staging, out)  # model.onnx + model.onnx_data, as fuse expects


def build(source: Path, out: Path) -> None:
    from bge_m3_lite.fuse import fuse
    from bge_m3_lite.quantize import QuantConfig, quantize

    out.mkdir(parents=True, exist_ok=True)
    tokenizer_file = source / "tokenizer.json"
    spm = out / SPM_FILE
    spm.write_bytes(sentencepiece_model(json.loads(tokenizer_file.read_text(encoding="utf-8"))))
    texts = probe_texts()
    bad = tokenizer_mismatches(spm, tokenizer_file, texts)
    if bad:
        raise SystemExit(f"{spm}: other ids than tokenizer.json on {len(bad)} texts: {bad[:3]}")
    say("lite", f"{SPM_FILE}: the ids of tokenizer.json on all {len(texts)} probe texts")
    for name in HEAD_FILES:
        shutil.copyfile(source / name, out / name)

    t = time.monotonic()
    say("lite", f"exporting the backbone (token_embeddings, opset {EXPORT_OPSET}; about a minute)")
    # In a child process: torch's copy of the weights would otherwise stay in this one, and the
    # calibration below needs about 19 GiB of its own.
    export = [sys.executable, "-m", "bench.lite", "--export-only", "--source", str(source)]
    subprocess.run([*export, "--out", str(out)], check=True)
    say("lite", f"exported in {_since(t)}; bge_m3_lite.fuse (about a minute)")
    t = time.monotonic()
    fused = fuse(out / "model.onnx")
    config = QuantConfig()
    say(
        "lite",
        f"fused in {_since(t)} ({fused.fused} merged tensors); bge_m3_lite.quantize with its "
        "defaults (it calibrates SmoothQuant on its bundled texts: minutes, about 19 GiB)",
    )
    t = time.monotonic()
    quantize(out / "model_fused.onnx", out / MODEL_FILE, config)
    say("lite", f"quantized in {_since(t)}")
    for name in ("model.onnx", "model.onnx_data", "model_fused.onnx", "model_fused.onnx_data"):
        (out / name).unlink()  # the int8 pair stands alone; these are 2.5 GB

    accepted = {name: file_digest(out / name) for name in (SPM_FILE, *HEAD_FILES)}
    (out / ACCEPTED_FILE).write_text(json.dumps(accepted, indent=2) + "\n")
    manifest = {
        "precision": "int8",
        "bench_baseline": f"bge-m3-lite {VERSION}: its fuse and quantize, default settings",
        "quantization": {"bge_m3_lite.QuantConfig": dataclasses.asdict(config)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def _since(start: float) -> str:
    return f"{time.monotonic() - start:.0f}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lite", description=__doc__)
    parser.add_argument("--source", type=Path, required=True, help="a full-size BGE-M3 layout")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_only:  # build()'s first step, in its own process
        export_backbone(args.source, args.out)
        return 0
    config = json.loads((args.source / "config.json").read_text())
    if (config["hidden_size"], config["num_attention_heads"]) != (1024, 16):
        raise SystemExit("bge-m3-lite runs only BGE-M3's shape (hidden size 1024, 16 heads)")
    start = time.monotonic()
    say("lite", f"bge-m3-lite {VERSION} int8 from {args.source} -> {args.out}")
    build(args.source, args.out)
    say("lite", f"{args.out} done in {_since(start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
