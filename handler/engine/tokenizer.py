"""Tokenization: the artifact's own tokenizer, through one of two backends.

- `tokenizers` (Hugging Face, no transformers) runs the artifact's tokenizer.json as it is. Every
  model has one; WordPiece models (MiniLM) always use it.
- `sentencepiece` runs a Unigram vocabulary (XLM-R, BGE-M3) when the build wrote
  `sentencepiece.model` and proved it gives the same ids (manifest `tokenizer.sentencepiece`). Why:
  `tokenizers` keeps its 250,002 pieces in a trie of hash maps that took 290 MiB and 0.8 s to
  load; sentencepiece's double-array trie takes about 60 MiB and 0.35 s (measured on BGE-M3's
  vocabulary). Everything around the vocabulary stays with `tokenizers`: the normalizer and the
  pre-tokenizer come from tokenizer.json (the small `tokenizer.frontend.json`, which omits the
  vocabulary), and the special tokens are split out of the text the way `tokenizers` does.

Whitespace: the build writes BGE-M3's tokenizer with a `WhitespaceSplit + Metaspace` pre-tokenizer,
so runs of whitespace (also trailing, and between literal special tokens) add no extra `▁` piece.
That is what FlagEmbedding with transformers 5.x gives (the reference implementation today, and
all 109 cases of tests/data/tokenizer_cases.json); the raw hub tokenizer.json under transformers
4.x adds a `▁` (id 6) in 7 of those cases. The runtime applies whatever the artifact says.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from tokenizers import PreTokenizedString, Token, Tokenizer

from handler.engine.errors import (
    InputError,
    InputTooLongError,
    ModelLoadError,
    TooManyTokensError,
)
from handler.engine.manifest import Manifest
from handler.engine.types import TokenInfo


class Backend(Protocol):
    name: str
    head: int  # special tokens the template puts before the text (<s>)
    tail: int  # ... and after it (</s>)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids per text, special tokens included, nothing cut."""
        ...

    def token_text(self, token_id: int) -> str:
        """One id decoded on its own (`▁What` -> `What`)."""
        ...

    def piece(self, token_id: int) -> str:
        """The vocabulary entry itself (`▁What`)."""
        ...

    def spans(self, text: str, add_special_tokens: bool) -> list[TokenInfo]:
        """The tokens of one text with their character offsets, nothing cut."""
        ...

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Ids (of this vocabulary) back to text."""
        ...


def token_info(
    text: str, token_id: int, piece: str, span: tuple[int, int], special: bool
) -> TokenInfo:
    """A token of `text`: its own characters and offsets, or, for a token the template added,
    its vocabulary entry and no offsets (text-embeddings-inference's SimpleToken)."""
    if special:
        return TokenInfo(id=token_id, text=piece, special=True, start=None, stop=None)
    start, stop = span
    return TokenInfo(id=token_id, text=text[start:stop], special=False, start=start, stop=stop)


class HuggingFaceBackend:
    name = "tokenizers"

    def __init__(self, path: Path):
        self._tok = Tokenizer.from_file(str(path))
        # We pad (batching.pad) and truncate ourselves, so an artifact's settings can't surprise.
        self._tok.no_padding()
        self._tok.no_truncation()
        mask = self._tok.encode("a").special_tokens_mask
        self.head = next(i for i, m in enumerate(mask) if not m)
        self.tail = len(mask) - 1 - max(i for i, m in enumerate(mask) if not m)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""

    def spans(self, text: str, add_special_tokens: bool) -> list[TokenInfo]:
        e = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return [
            token_info(text, i, piece, span, bool(special))
            for i, piece, span, special in zip(
                e.ids, e.tokens, e.offsets, e.special_tokens_mask, strict=True
            )
        ]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceBackend:
    """tokenizer.json's pipeline with its Unigram step done by sentencepiece: split out the
    special tokens, normalize, pre-tokenize into words, then the Viterbi segmentation of each word
    on its own, as `tokenizers` does (one call over the joined words ties differently on long
    unspaced Chinese)."""

    name = "sentencepiece"

    def __init__(self, model_file: Path, frontend_file: Path, *, cls: int, sep: int):
        import sentencepiece  # only images serving a Unigram model need it at all

        front = Tokenizer.from_file(str(frontend_file))
        self._normalizer = front.normalizer
        self._normalize: Callable[[str], str] = (
            front.normalizer.normalize_str if front.normalizer is not None else str
        )
        self._pre_tokenizer = front.pre_tokenizer
        self._decoder = front.decoder
        specials = {t.content: i for i, t in front.get_added_tokens_decoder().items()}
        self._specials = specials
        self._special_names = {i: name for name, i in specials.items()}
        # Longest first, so "<mask>" is never read as a shorter token that prefixes it.
        names = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self._cls, self._sep = cls, sep
        self.head = self.tail = 1

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(text) for text in texts]

    def _encode(self, text: str) -> list[int]:
        ids = [self._cls]
        parts = self._split.split(text) if self._split is not None else [text]
        # re.split with one group: text, special, text, special, ..., text.
        for index, part in enumerate(parts):
            if index % 2:
                ids.append(self._specials[part])
            elif part:
                for word in self._words(part):
                    ids.extend(self._sp.EncodeAsIds(word))
        ids.append(self._sep)
        return ids

    def _words(self, part: str) -> list[str]:
        normalized = self._normalize(part)
        if self._pre_tokenizer is None:
            return [normalized] if normalized else []
        return [word for word, _ in self._pre_tokenizer.pre_tokenize_str(normalized)]

    def token_text(self, token_id: int) -> str:
        piece = self.piece(token_id)
        return self._decoder.decode([piece]) if self._decoder is not None else piece

    def piece(self, token_id: int) -> str:
        return str(self._sp.IdToPiece(token_id))

    def spans(self, text: str, add_special_tokens: bool) -> list[TokenInfo]:
        """As `encode_batch`, with offsets: `tokenizers` itself maps each piece back through the
        pre-tokenizer's splits and the normalizer's alignments (a PreTokenizedString whose
        tokenize step is sentencepiece), so the offsets are those tokenizer.json would give."""
        out: list[TokenInfo] = []
        if add_special_tokens:
            out.append(token_info(text, self._cls, self._special_names[self._cls], (0, 0), True))
        parts = self._split.split(text) if self._split is not None else [text]
        pos = 0
        for index, part in enumerate(parts):
            if index % 2:
                span = (pos, pos + len(part))
                out.append(token_info(text, self._specials[part], part, span, False))
            elif part:
                for token_id, (start, stop) in self._part_spans(part):
                    span = (pos + start, pos + stop)
                    out.append(token_info(text, token_id, "", span, False))
            pos += len(part)
        if add_special_tokens:
            out.append(token_info(text, self._sep, self._special_names[self._sep], (0, 0), True))
        return out

    def _part_spans(self, part: str) -> list[tuple[int, tuple[int, int]]]:
        pre = PreTokenizedString(part)
        if self._normalizer is not None:
            pre.normalize(self._normalizer.normalize)
        if self._pre_tokenizer is not None:
            self._pre_tokenizer.pre_tokenize(pre)
        # sentencepiece's pieces carry their UTF-8 byte span in the word, the offsets that
        # `tokenizers` expects from a model's tokenize step.
        pre.tokenize(
            lambda word: [
                Token(p.id, p.piece, (p.begin, p.end))
                for p in self._sp.encode(str(word), out_type="proto").pieces
            ]
        )
        encoding = pre.to_encoding()
        return list(zip(encoding.ids, encoding.offsets, strict=True))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        pieces = [
            self._special_names.get(i) or self.piece(i)
            for i in ids
            if not (skip_special_tokens and i in self._special_names)
        ]
        return self._decoder.decode(pieces) if self._decoder is not None else "".join(pieces)


def load_backend(model_dir: Path, manifest: Manifest) -> Backend:
    spm = manifest.sentencepiece
    if spm is None:
        return HuggingFaceBackend(model_dir / manifest.tokenizer_file)
    specials = manifest.special_tokens
    try:
        return SentencePieceBackend(
            model_dir / spm.model_file,
            model_dir / spm.frontend_file,
            cls=specials["cls"],
            sep=specials["sep"],
        )
    except (OSError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(
            f"{model_dir}: cannot load the sentencepiece tokenizer ({exc})"
        ) from exc


class TextTokenizer:
    def __init__(self, backend: Backend, *, vocab_size: int):
        self.backend = backend
        self.vocab_size = vocab_size
        self._head, self._tail = backend.head, backend.tail
        self.num_special = backend.head + backend.tail

    @classmethod
    def load(cls, model_dir: Path, manifest: Manifest) -> TextTokenizer:
        return cls(load_backend(model_dir, manifest), vocab_size=manifest.vocab_size)

    def encode(
        self,
        texts: Sequence[str],
        *,
        max_length: int,
        truncate: bool,
        max_tokens: int | None = None,
    ) -> TokenBatch:
        """Token ids per text, special tokens included, cut to `max_length` (or an error)."""
        if max_length <= self.num_special:
            raise InputError(
                f"max_length must be greater than {self.num_special}", param="max_length"
            )
        encoded = self.backend.encode_batch(list(texts))
        return fit(
            encoded, self._cut, max_length=max_length, truncate=truncate, max_tokens=max_tokens
        )

    def _cut(self, ids: list[int], max_length: int) -> list[int]:
        # Keep the leading specials, the first tokens of the text and the trailing specials, as
        # the tokenizers library's own truncation does for a single sequence.
        keep = max_length - self.num_special
        tail = ids[len(ids) - self._tail :] if self._tail else []
        return ids[: self._head + keep] + tail

    def check_ids(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        max_length: int,
        truncate: bool,
        max_tokens: int | None = None,
    ) -> TokenBatch:
        """Token-id input: ids of this vocabulary, range-checked, used as given (cut at the end)."""
        checked = [checked_ids(index, seq, self.vocab_size) for index, seq in enumerate(sequences)]
        return fit(
            checked,
            lambda ids, limit: ids[:limit],
            max_length=max_length,
            truncate=truncate,
            max_tokens=max_tokens,
        )

    def tokens(self, texts: Sequence[str], *, add_special_tokens: bool) -> list[list[TokenInfo]]:
        """Each text's tokens with their character offsets, as encode() splits them (uncut)."""
        return [self.backend.spans(text, add_special_tokens) for text in texts]

    def decode(self, sequences: Sequence[Sequence[int]], *, skip_special_tokens: bool) -> list[str]:
        """Each id sequence back to text; an id outside the vocabulary is refused, as in
        token-id input."""
        out: list[str] = []
        for index, sequence in enumerate(sequences):
            ids = [int(t) for t in sequence]
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InputError(
                    f"ids[{index}] has token id {bad}, outside this model's vocabulary "
                    f"[0, {self.vocab_size}).",
                    param="ids",
                    code="token_id_out_of_range",
                )
            out.append(self.backend.decode(ids, skip_special_tokens))
        return out

    def token_strings(self, weights: Mapping[int, float]) -> dict[str, float]:
        """Sparse weights keyed by the decoded token text (the v2 and native APIs' format). Two ids
        that decode to the same text (`▁What` and `What`) keep the larger weight."""
        out: dict[str, float] = {}
        for token_id, w in weights.items():
            decoded = self.backend.token_text(token_id)
            # A bare word-boundary piece ("▁", id 6) decodes to nothing; keep the piece itself so
            # no weight hides behind an empty key.
            text = decoded if decoded.strip() else (self.backend.piece(token_id) or decoded)
            if w > out.get(text, float("-inf")):
                out[text] = w
        return out


def checked_ids(index: int, sequence: Sequence[int], vocab_size: int) -> list[int]:
    """One token-id input as ints, refused when empty or when an id is outside the vocabulary
    (ids of another tokenizer, such as tiktoken's, look valid but give meaningless vectors)."""
    ids = [int(t) for t in sequence]
    if not ids:
        raise InputError(
            f"input[{index}] is an empty list of token ids.", param="input", code="empty_input"
        )
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InputError(
            f"input[{index}] has token id {bad}, outside this model's vocabulary "
            f"[0, {vocab_size}). Token ids must come from this model's tokenizer.",
            param="input",
            code="token_id_out_of_range",
        )
    return ids


class TokenBatch(list[list[int]]):
    """Token ids per input, as `fit` leaves them, and which inputs it cut to max_length (so a
    response can say so without tokenizing again)."""

    def __init__(self, sequences: Sequence[list[int]], truncated: Sequence[bool]):
        super().__init__(sequences)
        self.truncated = list(truncated)


def fit(
    sequences: Sequence[list[int]],
    cut: Callable[[list[int], int], list[int]],
    *,
    max_length: int,
    truncate: bool,
    max_tokens: int | None,
) -> TokenBatch:
    """Every sequence cut to `max_length`; then the total of the cut lengths held to
    `max_tokens`; then, without `truncate`, the first over-long input refused. The total comes
    first because `truncate` cannot lift it: a caller told only "too long" would retry with
    truncation and then hear about the total."""
    out: list[list[int]] = []
    cut_flags: list[bool] = []
    too_long: tuple[int, int] | None = None
    for index, ids in enumerate(sequences):
        cut_flags.append(len(ids) > max_length)
        if len(ids) > max_length:
            too_long = too_long or (index, len(ids))
            ids = cut(ids, max_length)
        out.append(ids)
    check_total_tokens([len(ids) for ids in out], max_tokens)
    if too_long is not None and not truncate:
        index, tokens = too_long
        raise InputTooLongError(
            f"input {index} has {tokens} tokens, more than the limit of {max_length}; "
            "shorten it or allow truncation",
            index=index,
            tokens=tokens,
            limit=max_length,
        )
    return TokenBatch(out, cut_flags)


def check_total_tokens(lengths: Sequence[int], max_tokens: int | None) -> None:
    """TooManyTokensError when the inputs of one call hold more than `max_tokens` tokens."""
    total = sum(lengths)
    if max_tokens is not None and total > max_tokens:
        raise TooManyTokensError(total=total, limit=max_tokens)
