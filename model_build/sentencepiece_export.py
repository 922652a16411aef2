"""The artifact's Unigram vocabulary as a sentencepiece model, for the runtime's lighter tokenizer.

`tokenizers` holds BGE-M3's 250,002 pieces in 290 MiB and takes 0.8 s to load them; sentencepiece
holds the same pieces in about 60 MiB and loads them in 0.35 s. The runtime keeps tokenizer.json's
normalizer, pre-tokenizer, special tokens and decoder (handler/engine/tokenizer.py), so only the
Viterbi segmentation of each word moves to sentencepiece. Two files are written:

- `sentencepiece.model`: every piece with its score and id, the unknown token, the special tokens as
  control symbols; sentencepiece's own normalizer is off (the text reaches it normalized);
- `tokenizer.frontend.json`: tokenizer.json without its vocabulary.

They are used only if they give exactly the ids of tokenizer.json on every probe text (the
validation and calibration sets, awkward whitespace and Unicode, random code points, and all of
them joined into one long text). Otherwise both are removed, the manifest says why, and the
runtime loads tokenizer.json as before.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from handler.engine.manifest import SentencePieceSection
from handler.engine.tokenizer import SentencePieceBackend
from model_build.tokenizer import PreparedTokenizer

MODEL_FILE = "sentencepiece.model"
FRONTEND_FILE = "tokenizer.frontend.json"

# Whitespace, normalization and special-token edges where two tokenizers most often part ways.
EDGE_TEXTS = (
    "",
    " ",
    "  lead and trail  ",
    "a\tb\nc\r\nd",
    "x\u00a0y\u2003z\u3000w",
    "x\u2028y\u2029z\u0085w\u1680v",
    "zero\u200bwidth\u200djoin\ufeffbom",
    "<s>literal</s> <pad> <unk> <mask>",
    "x<mask>y  <mask>  z",
    "ﬁ ligature Ａｂｃ１２３ ①② ™ ㎏",
    "e\u0301 é \u00e9 Å \u212b",
    "ｶﾀｶﾅ半角 ﾊﾟﾋﾟﾌﾟ",
    "中文测试，日本語のテキスト。한국어 문장",
    "عربي فارسی עברית हिन्दी ไทย",
    "😀🎉👍🏽 👨‍👩‍👧",
    "\x00control\x07chars\x1f",
    "soft\u00adhyphen mongolian\u180evowel replacement\ufffd",
)


def _random_texts(count: int, seed: int = 0) -> list[str]:
    """Seeded strings of code points from every plane the vocabulary covers (no surrogates)."""
    rng = random.Random(seed)
    ranges = ((0x20, 0x7E), (0xA0, 0x2FFF), (0x3000, 0xD7FF), (0xE000, 0xFFEF), (0x1F300, 0x1FAFF))
    texts = []
    for _ in range(count):
        length = rng.randint(1, 40)
        texts.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length)))
    return texts


def probe_texts(texts: Sequence[str], random_count: int = 1000) -> list[str]:
    probes = [*texts, *EDGE_TEXTS, *_random_texts(random_count)]
    return [*probes, " ".join(probes)]


def _unsupported(doc: dict[str, Any]) -> str | None:
    model = doc.get("model") or {}
    if model.get("type") != "Unigram":
        return f"the vocabulary is {model.get('type')}, not Unigram"
    if model.get("byte_fallback"):
        return "the Unigram model uses byte fallback"
    for token in doc.get("added_tokens") or []:
        if not token.get("special") or token.get("normalized"):
            return f"added token {token.get('content')!r} is not a plain special token"
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token.get('content')!r} strips whitespace"
    return None


def _model_proto(doc: dict[str, Any]) -> bytes:
    from sentencepiece import sentencepiece_model_pb2

    pb: Any = sentencepiece_model_pb2  # generated protobuf code, untyped

    piece_type = pb.ModelProto.SentencePiece
    model = doc["model"]
    unk_id = int(model["unk_id"])
    special_ids = {int(t["id"]) for t in doc.get("added_tokens") or []}
    proto = pb.ModelProto()
    for index, (piece, score) in enumerate(model["vocab"]):
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, float(score)
        if index == unk_id:
            entry.type = piece_type.UNKNOWN
        elif index in special_ids:
            entry.type = piece_type.CONTROL
        else:
            entry.type = piece_type.NORMAL
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.UNIGRAM
    spec.vocab_size = len(proto.pieces)
    spec.unk_id = unk_id
    # sentencepiece wants these to name real pieces or -1; the runtime adds <s> </s> itself.
    spec.bos_id = spec.eos_id = spec.pad_id = -1
    # The text arrives normalized and split into ▁-prefixed words by tokenizer.json's own steps.
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = False
    return bytes(proto.SerializeToString())


def _frontend(doc: dict[str, Any]) -> dict[str, Any]:
    unk = doc["model"]["vocab"][int(doc["model"]["unk_id"])][0]
    # tokenizers needs a model to load the file (the runtime never runs it). A vocabulary of just
    # the special tokens keeps their ids: added tokens missing from it would be renumbered.
    specials = {t["content"]: int(t["id"]) for t in doc.get("added_tokens") or []}
    return {
        **doc,
        "model": {"type": "WordLevel", "vocab": {unk: 0, **specials}, "unk_token": unk},
        "post_processor": None,
        "truncation": None,
        "padding": None,
    }


def export(tok: PreparedTokenizer, out_dir: Path, texts: Sequence[str]) -> SentencePieceSection:
    """Write the two files into `out_dir` if they reproduce `tok` (what tokenizer.json holds); the
    manifest's `tokenizer.sentencepiece` section either way."""
    doc = json.loads(tok.to_json())
    reason = _unsupported(doc)
    if reason is not None:
        return SentencePieceSection(used=False, reason=reason)
    model_path, frontend_path = out_dir / MODEL_FILE, out_dir / FRONTEND_FILE
    model_path.write_bytes(_model_proto(doc))
    frontend_path.write_text(json.dumps(_frontend(doc), ensure_ascii=False), encoding="utf-8")

    probes = probe_texts(texts)
    expected = [e.ids for e in tok.tokenizer.encode_batch(probes, add_special_tokens=True)]
    specials = tok.special_tokens
    lighter = SentencePieceBackend(
        model_path, frontend_path, cls=specials["cls"], sep=specials["sep"]
    )
    got = lighter.encode_batch(probes)
    differ = [i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b]
    if differ:
        model_path.unlink()
        frontend_path.unlink()
        first = probes[differ[0]]
        return SentencePieceSection(
            used=False,
            reason=f"{len(differ)} of {len(probes)} probe texts tokenize differently "
            f"from tokenizer.json (first: {first[:60]!r})",
        )
    return SentencePieceSection(
        used=True,
        model=MODEL_FILE,
        frontend=FRONTEND_FILE,
        probe_texts=len(probes),
        probe_tokens=sum(len(ids) for ids in got),
    )
