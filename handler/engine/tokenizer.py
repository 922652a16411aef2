"""Tokenization with the artifact's own tokenizer.json (Hugging Face `tokenizers`, no transformers).

Whitespace: the build writes BGE-M3's tokenizer with a `WhitespaceSplit + Metaspace` pre-tokenizer,
so runs of whitespace (also trailing, and between literal special tokens) add no extra `▁` piece.
That is what FlagEmbedding with transformers 5.x gives (the reference implementation today, and
all 109 cases of tests/data/tokenizer_cases.json); the raw hub tokenizer.json under transformers
4.x adds a `▁` (id 6) in 7 of those cases. The runtime applies whatever the artifact says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from handler.engine.errors import InputError, InputTooLongError


class TextTokenizer:
    def __init__(self, path: Path, *, vocab_size: int):
        self._tok = Tokenizer.from_file(str(path))
        # We pad (batching.pad) and truncate ourselves, so an artifact's settings can't surprise.
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = vocab_size
        # How many special tokens the template puts before and after the text ([CLS] x [SEP]).
        probe = self._tok.encode("a")
        mask = probe.special_tokens_mask
        self._head = next(i for i, m in enumerate(mask) if not m)
        self._tail = len(mask) - 1 - max(i for i, m in enumerate(mask) if not m)
        self.num_special = self._head + self._tail

    def encode(self, texts: Sequence[str], *, max_length: int, truncate: bool) -> list[list[int]]:
        """Token ids per text, special tokens included, cut to `max_length` (or an error)."""
        if max_length <= self.num_special:
            raise InputError(
                f"max_length must be greater than {self.num_special}", param="max_length"
            )
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=True)
        out: list[list[int]] = []
        for index, enc in enumerate(encodings):
            ids = enc.ids
            if len(ids) > max_length:
                if not truncate:
                    raise InputTooLongError(
                        f"input {index} has {len(ids)} tokens, more than the limit of "
                        f"{max_length}; shorten it or allow truncation",
                        index=index,
                        tokens=len(ids),
                        limit=max_length,
                    )
                ids = self._cut(ids, max_length)
            out.append(ids)
        return out

    def _cut(self, ids: list[int], max_length: int) -> list[int]:
        # Keep the leading specials, the first tokens of the text and the trailing specials, as
        # the tokenizers library's own truncation does for a single sequence.
        keep = max_length - self.num_special
        tail = ids[len(ids) - self._tail :] if self._tail else []
        return ids[: self._head + keep] + tail

    def check_ids(
        self, sequences: Sequence[Sequence[int]], *, max_length: int, truncate: bool
    ) -> list[list[int]]:
        """Token-id input: ids of this vocabulary, range-checked, used as given."""
        out: list[list[int]] = []
        for index, seq in enumerate(sequences):
            ids = [int(t) for t in seq]
            if not ids:
                raise InputError(f"input {index} is an empty list of token ids", param="input")
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InputError(
                    f"input {index} has token id {bad}, outside this model's vocabulary "
                    f"[0, {self.vocab_size})",
                    param="input",
                )
            if len(ids) > max_length:
                if not truncate:
                    raise InputTooLongError(
                        f"input {index} has {len(ids)} tokens, more than the limit of {max_length}",
                        index=index,
                        tokens=len(ids),
                        limit=max_length,
                    )
                ids = ids[:max_length]
            out.append(ids)
        return out

    def token_strings(self, weights: Mapping[int, float]) -> dict[str, float]:
        """Sparse weights keyed by the decoded token text (the seeds' format). Two ids that decode
        to the same text (`▁What` and `What`) keep the larger weight."""
        ids = list(weights)
        texts = self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
        out: dict[str, float] = {}
        for token_id, decoded in zip(ids, texts, strict=True):
            # A bare word-boundary piece ("▁", id 6) decodes to nothing; keep the piece itself so
            # no weight hides behind an empty key.
            text = decoded if decoded.strip() else (self._tok.id_to_token(token_id) or decoded)
            w = weights[token_id]
            if w > out.get(text, float("-inf")):
                out[text] = w
        return out
