"""Texts of exact token counts, made with the model's own tokenizer.

XLM-R's pre-tokenizer splits on whitespace before the unigram model runs, so a text of words
joined by single spaces costs `specials + sum(cost of each word)` tokens. Words are drawn from a
fixed multilingual list by a seeded generator, then one-token filler words close the gap; the whole
text is tokenized once more to check the count is exact.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer

_WORDS = (
    "the search engine ranks passages by dense sparse and multi vector similarity while the "
    "index keeps every document close to its neighbours retrieval augmented generation needs "
    "fast embeddings for long contracts manuals scientific papers and short questions "
    "Berlin Tokyo Lisbon Nairobi Santiago climate energy river mountain library hospital "
    "Suchmaschine Wissenschaft Bibliothek recherche documentaire modèle multilingue "
    "búsqueda semántica conocimiento 検索 埋め込み 文書 모델 검색 поиск документы "
    "بحث نموذج ค้นหา tìm kiếm mô hình 2026 42 3.14 API JSON Lambda"
)
WORDS = tuple(_WORDS.split())
FILLER = "a"  # one token: "▁a"


class TokenTexts:
    def __init__(self, tokenizer_json: Path):
        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._cost = {
            w: len(self._tok.encode(w, add_special_tokens=False).ids) for w in (*WORDS, FILLER)
        }
        self.num_special = len(self._tok.encode("a").ids) - self._cost[FILLER]
        if self._cost[FILLER] != 1:
            raise RuntimeError(f"filler word {FILLER!r} is not one token in this vocabulary")

    def count(self, text: str) -> int:
        return len(self._tok.encode(text).ids)

    def make(self, tokens: int, seed: int) -> str:
        """A text that tokenizes to exactly `tokens` ids, special tokens included."""
        target = tokens - self.num_special
        if target < 1:
            raise ValueError(f"{tokens} tokens leave no room for text")
        rng = random.Random(seed)
        words: list[str] = []
        used = 0
        while True:
            word = rng.choice(WORDS)
            if used + self._cost[word] > target:
                break
            words.append(word)
            used += self._cost[word]
        words.extend([FILLER] * (target - used))
        text = " ".join(words)
        got = self.count(text)
        while got != tokens:  # never seen; kept so that a vocabulary change cannot go unnoticed
            if got < tokens:
                text += f" {FILLER}"
            elif text.endswith(f" {FILLER}"):
                text = text[: -len(FILLER) - 1]
            else:
                raise RuntimeError(f"cannot make a text of exactly {tokens} tokens (got {got})")
            got = self.count(text)
        return text

    def many(self, n: int, tokens: int, seed: int) -> list[str]:
        return [self.make(tokens, seed * 1000 + i) for i in range(n)]
