"""Deterministic fake engines implementing handler.engine.types.EmbeddingEngine, for route tests.

- Tokens are whitespace-separated words (plus <s> and </s>); a word's id is a hash of it.
- Vectors are seeded by the token ids actually used (so truncation changes them), L2-normalised.
- Sparse weights: one hashed weight in (0, 1) per distinct word; ColBERT: one row per token
  after <s>. The same input always gives the same numbers, in any batch, in any order.

`bge_m3_like()` has all three outputs; `dense_only()` has dense only, like the MiniLM build.
`FakeEngine.gate` lets a test hold a request inside the engine (for the in-flight limit).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import zlib
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from handler.engine import heads, scoring
from handler.engine.compact import Ranges
from handler.engine.errors import CapabilityError, InputError
from handler.engine.tokenizer import checked_ids, fit
from handler.engine.types import (
    Capabilities,
    Encoded,
    FloatArray,
    ModelInfo,
    ModelRegistry,
    TokenInfo,
)

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIALS = {BOS, PAD, EOS, UNK}


T = TypeVar("T")


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """`coroutine` on an event loop of its own. Not asyncio.run: it leaves the main thread with
    no current event loop, and Mangum (the Lambda tests that run later) asks for one."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def _unit(seed_bytes: bytes, shape: tuple[int, ...]) -> FloatArray:
    seed = int.from_bytes(hashlib.sha256(seed_bytes).digest()[:8], "little")
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    out: FloatArray = (x / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def _weight(token_id: int) -> float:
    return ((zlib.crc32(f"w{token_id}".encode()) % 9973) + 1) / 10000.0


@dataclass
class FakeEngine(scoring.PairScoring):
    model_id: str = "bge-m3"
    aliases: tuple[str, ...] = ("BAAI/bge-m3",)
    dims: int = 32
    max_length: int = 64
    vocab_size: int = 250_002
    capabilities: Capabilities = field(
        default_factory=lambda: Capabilities(dense=True, sparse=True, colbert=True)
    )
    recipe: str = "bge-m3"
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _words: dict[int, str] = field(default_factory=dict)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            id=self.model_id,
            aliases=self.aliases,
            dims=self.dims,
            max_length=self.max_length,
            vocab_size=self.vocab_size,
            capabilities=self.capabilities,
            recipe=self.recipe,
            precision="fp32",
            fingerprint=hashlib.sha256(self.model_id.encode()).hexdigest(),
            source="BAAI/bge-m3" if self.recipe == "bge-m3" else "/models/minilm",
            revision="5617a9f61b028005a4858fdac845db406aefb181",
            created=1_700_000_000,
            device="cpu",
        )

    @property
    def embedding_ranges(self) -> Ranges | None:
        # Fixed, as a build's would be: unit vectors of 32 dims rarely leave [-0.6, 0.6].
        return Ranges(
            np.full(self.dims, -0.6, dtype=np.float32), np.full(self.dims, 0.6, dtype=np.float32)
        )

    # ---- tokenizer -------------------------------------------------------------------------
    def word_id(self, word: str) -> int:
        token_id = 4 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 4)
        self._words.setdefault(token_id, word)
        return token_id

    def tokenize(self, text: str) -> list[int]:
        return [BOS, *(self.word_id(w) for w in text.split()), EOS]

    @staticmethod
    def _cut(ids: list[int], limit: int) -> list[int]:
        return [*ids[: limit - 1], ids[-1]]

    def _limit(self, max_length: int | None) -> int:
        if max_length is None:
            return self.max_length
        if max_length < 3:
            raise InputError("max_length must be greater than 2", param="max_length")
        return min(max_length, self.max_length)

    # ---- EmbeddingEngine -------------------------------------------------------------------
    def token_strings(self, weights: Mapping[int, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for token_id, w in weights.items():
            text = self._words.get(token_id, f"tok{token_id}")
            out[text] = max(w, out.get(text, float("-inf")))
        return out

    def tokens(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[TokenInfo]]:
        out = []
        for text in texts:
            words = [
                TokenInfo(self.word_id(m.group()), m.group(), False, m.start(), m.end())
                for m in re.finditer(r"\S+", text)
            ]
            if add_special_tokens:
                words = [
                    TokenInfo(BOS, "<s>", True, None, None),
                    *words,
                    TokenInfo(EOS, "</s>", True, None, None),
                ]
            out.append(words)
        return out

    def decode(
        self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        names = {BOS: "<s>", PAD: "<pad>", EOS: "</s>", UNK: "<unk>"}
        out = []
        for index, seq in enumerate(ids):
            checked = checked_ids(index, seq, self.vocab_size) if seq else []
            words = [
                names.get(t) or self._words.get(t, f"tok{t}")
                for t in checked
                if not (skip_special_tokens and t in SPECIALS)
            ]
            out.append(" ".join(words))
        return out

    def encode(
        self,
        texts: Sequence[str],
        *,
        dense: bool = True,
        sparse: bool = False,
        colbert: bool = False,
        max_length: int | None = None,
        truncate: bool = True,
        max_tokens: int | None = None,
        dimensions: int | None = None,
    ) -> Encoded:
        self.calls.append(
            (
                "encode",
                {
                    "texts": list(texts),
                    "dense": dense,
                    "sparse": sparse,
                    "colbert": colbert,
                    "max_length": max_length,
                    "truncate": truncate,
                },
            )
        )
        heads.check_dimensions(dimensions, self.dims, self.model_id)
        limit = self._limit(max_length)
        ids = fit(
            [self.tokenize(t) for t in texts],
            self._cut,
            max_length=limit,
            truncate=truncate,
            max_tokens=max_tokens,
        )
        encoded = self._run(ids, dense, sparse, colbert)
        encoded.truncated = ids.truncated
        return heads.shortened(encoded, dimensions)

    def encode_ids(
        self,
        ids: Sequence[Sequence[int]],
        *,
        dense: bool = True,
        sparse: bool = False,
        colbert: bool = False,
        max_length: int | None = None,
        truncate: bool = True,
        max_tokens: int | None = None,
        dimensions: int | None = None,
    ) -> Encoded:
        self.calls.append(("encode_ids", {"ids": [list(s) for s in ids], "truncate": truncate}))
        heads.check_dimensions(dimensions, self.dims, self.model_id)
        checked = fit(
            [checked_ids(i, seq, self.vocab_size) for i, seq in enumerate(ids)],
            self._cut,
            max_length=self._limit(max_length),
            truncate=truncate,
            max_tokens=max_tokens,
        )
        encoded = self._run(checked, dense, sparse, colbert)
        encoded.truncated = checked.truncated
        return heads.shortened(encoded, dimensions)

    def _run(self, ids: list[list[int]], dense: bool, sparse: bool, colbert: bool) -> Encoded:
        asked = {"dense": dense, "sparse": sparse, "colbert": colbert}
        if not any(asked.values()):
            raise InputError("ask for at least one of dense, sparse or colbert")
        for head, on in asked.items():
            if on and not getattr(self.capabilities, head):
                raise CapabilityError(f"model '{self.model_id}' has no {head} output", param=head)
        if self.gate is not None:
            self.entered.set()
            assert self.gate.wait(timeout=30), "test gate was never opened"
        return Encoded(
            dense=np.stack([self.dense_of(s) for s in ids]) if dense else None,
            sparse=[self.sparse_of(s) for s in ids] if sparse else None,
            colbert=[self.colbert_of(s) for s in ids] if colbert else None,
            token_counts=[len(s) for s in ids],
            timings_ms={"tokenize": 0.5, "infer": 2.0, "post": 0.25},
        )

    # ---- the numbers, also used by tests to compute expectations ---------------------------
    def dense_of(self, ids: Sequence[int]) -> FloatArray:
        return _unit(f"{self.model_id}:dense:{list(ids)}".encode(), (self.dims,))

    def sparse_of(self, ids: Sequence[int]) -> dict[int, float]:
        return {t: _weight(t) for t in ids if t not in SPECIALS}

    def colbert_of(self, ids: Sequence[int]) -> FloatArray:
        return _unit(f"{self.model_id}:colbert:{list(ids)}".encode(), (len(ids) - 1, self.dims))

    def expected_dense(self, text: str) -> FloatArray:
        ids = self.tokenize(text)
        return self.dense_of(
            ids if len(ids) <= self.max_length else self._cut(ids, self.max_length)
        )


def bge_m3_like(**kwargs: Any) -> FakeEngine:
    return FakeEngine(**kwargs)


def dense_only(**kwargs: Any) -> FakeEngine:
    params: dict[str, Any] = {
        "model_id": "all-MiniLM-L6-v2",
        "aliases": ("sentence-transformers/all-MiniLM-L6-v2", "minilm"),
        "dims": 24,
        "max_length": 32,
        "vocab_size": 30522,
        "capabilities": Capabilities(dense=True, sparse=False, colbert=False),
        "recipe": "dense",
    }
    params.update(kwargs)
    return FakeEngine(**params)


def registry(*engines: FakeEngine) -> ModelRegistry:
    return ModelRegistry(list(engines) or [bge_m3_like()])


# ---- app and server helpers for the API tests ------------------------------------------------


def settings(**overrides: Any) -> Any:
    """Settings for a test: explicit values only where the environment could interfere."""
    from handler.settings import Settings

    base: dict[str, Any] = {"model_path": "", "api_key": None, "max_response_bytes": 0}
    base.update(overrides)
    return Settings(**base)


def make_app(*engines: FakeEngine, **overrides: Any) -> Any:
    from handler.app import create_app

    return create_app(settings(**overrides), registry(*engines))


class LiveServer:
    """The app on a real uvicorn server on 127.0.0.1 (a free port), in a thread."""

    def __init__(self, app: Any):
        import socket

        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Nagle off, as handler.main.serve has it: clients see the server's real timing.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:  # readiness poll, bounded; no test asserts on time
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
