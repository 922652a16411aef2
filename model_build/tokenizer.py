"""The artifact's tokenizer.json: the source's fast tokenizer with truncation and padding off (the
engine truncates and pads itself) and, for SentencePiece (Metaspace) vocabularies, the
pre-tokenizer that matches FlagEmbedding under transformers 5.x.

Why the pre-tokenizer changes: BAAI/bge-m3's raw tokenizer.json (`Metaspace`, add_prefix_space)
turns trailing whitespace, and whitespace between literal special tokens, into an extra "▁" piece
(id 6). FlagEmbedding with transformers 5.x does not, and neither do the 109 reference cases in
tests/data/tokenizer_cases.json. Splitting on whitespace first and then applying Metaspace with
prepend_scheme="always" reproduces all of them. WordPiece (BERT) tokenizers are left as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, pre_tokenizers

from model_build.errors import SourceError

METASPACE_FIX = (
    'Sequence([WhitespaceSplit(), Metaspace(replacement="▁", prepend_scheme="always", split=True)])'
)
SPECIAL_KEYS = ("cls", "sep", "pad", "unk")
_FALLBACK_NAMES = {
    "cls": ("<s>", "[CLS]", "<cls>"),
    "sep": ("</s>", "[SEP]", "<sep>"),
    "pad": ("<pad>", "[PAD]"),
    "unk": ("<unk>", "[UNK]"),
}


@dataclass
class PreparedTokenizer:
    tokenizer: Tokenizer
    pre_tokenizer: str  # what the manifest records
    original_pre_tokenizer: str
    special_tokens: dict[str, int]

    def to_json(self) -> str:
        return self.tokenizer.to_str(pretty=False)

    @contextmanager
    def truncating(self, max_length: int) -> Iterator[Tokenizer]:
        """The tokenizer, truncating to `max_length` tokens (specials included) inside the block:
        for the build's own validation and calibration runs; the written file never truncates."""
        self.tokenizer.enable_truncation(max_length)
        try:
            yield self.tokenizer
        finally:
            self.tokenizer.no_truncation()


def _describe(node: Any) -> str:
    if not isinstance(node, dict):
        return "none"
    kind = str(node.get("type"))
    if kind == "Sequence":
        inner = node.get("pretokenizers") or []
        return f"Sequence([{', '.join(_describe(n) for n in inner)}])"
    args = ", ".join(f"{k}={v!r}" for k, v in node.items() if k != "type")
    return f"{kind}({args})"


def _uses_metaspace(node: Any) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Metaspace":
        return True
    if node.get("type") == "Sequence":
        return any(_uses_metaspace(n) for n in node.get("pretokenizers") or [])
    return False


def _token_name(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _special_names(source_dir: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    # special_tokens_map.json wins over tokenizer_config.json, as in transformers.
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = source_dir / file
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in SPECIAL_KEYS:
            name = _token_name(data.get(f"{key}_token"))
            if name:
                names[key] = name
    return names


def special_token_ids(tokenizer: Tokenizer, source_dir: Path) -> dict[str, int]:
    names = _special_names(source_dir)
    ids: dict[str, int] = {}
    for key in SPECIAL_KEYS:
        candidates = ([names[key]] if key in names else []) + list(_FALLBACK_NAMES[key])
        for name in candidates:
            token_id = tokenizer.token_to_id(name)
            if token_id is not None:
                ids[key] = int(token_id)
                break
        else:
            raise SourceError(f"{source_dir}: cannot find the {key} token id in the tokenizer")
    return ids


def prepare_tokenizer(source_dir: Path) -> PreparedTokenizer:
    path = source_dir / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise SourceError(f"{path}: cannot be loaded as a tokenizers file ({exc})") from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    current = tokenizer.pre_tokenizer
    node = json.loads(current.__getstate__()) if current is not None else None
    original = _describe(node)
    if _uses_metaspace(node):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            ]
        )
        description = METASPACE_FIX
    else:
        description = f"unchanged: {original}"
    specials = special_token_ids(tokenizer, source_dir)
    # The heads assume <cls> first and <sep> last (ColBERT drops position 0).
    probe = tokenizer.encode("a").ids
    if not probe or probe[0] != specials["cls"] or probe[-1] != specials["sep"]:
        raise SourceError(
            f"{path}: the tokenizer does not wrap texts in cls/sep "
            f"(got {probe} for 'a', cls={specials['cls']}, sep={specials['sep']})"
        )
    return PreparedTokenizer(
        tokenizer=tokenizer,
        pre_tokenizer=description,
        original_pre_tokenizer=original,
        special_tokens=specials,
    )
