"""The engine: tokenize -> length-sorted batches -> ONNX run -> heads -> input order.

Uses only onnxruntime, tokenizers, sentencepiece (for Unigram vocabularies) and numpy. One Engine
serves one model directory made by `python -m model_build --out DIR`; it is built once per
container and shared by every request.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handler.engine import heads, scoring
from handler.engine.batching import pad, plan_batches
from handler.engine.cache import CACHED, COMPUTED, SHARED, EmbedCache, first_occurrences
from handler.engine.compact import Ranges
from handler.engine.errors import CapabilityError, InputError, ModelLoadError
from handler.engine.manifest import Manifest, VerifyMode, load_manifest, verify_files
from handler.engine.memory import release_freed_heap
from handler.engine.session import (
    Device,
    create_session,
    default_threads,
    session_device,
    x86_without_vnni,
)
from handler.engine.tokenizer import TextTokenizer, TokenBatch
from handler.engine.types import (
    HEADS,
    Capabilities,
    Encoded,
    FloatArray,
    ModelInfo,
    ModelRegistry,
    TokenInfo,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    threads: int | None = None  # None: default_threads(cpu_limit)
    # vCPUs the platform really grants where it shows the process more cores (Lambda: what
    # its memory size buys); threads stay within it by default.
    cpu_limit: int | None = None
    # Padded tokens per forward pass (rows x longest row). Bounds activation memory.
    batch_token_budget: int = 16384
    # Rows x longest^2 per padded forward pass: bounds the masked attention's scores
    # (heads x this x 4 bytes: 256 MiB for BGE-M3's 16 heads). See batching.py.
    attention_square_budget: int = 1 << 22
    max_batch_size: int = 64
    verify: VerifyMode = "sha256"
    device: Device = "cpu"
    warmup: bool = True
    # Entries of the in-process LRU cache of per-input outputs (0: no cache). See cache.py.
    cache_size: int = 0
    # Give the heap the load freed back to the kernel once the session is built and warm
    # (glibc only; see memory.py).
    release_heap: bool = True


@dataclass
class _Tokens:
    ids: list[list[int]]
    tokenize_ms: float = 0.0


@dataclass
class Engine(scoring.PairScoring):
    manifest: Manifest
    tokenizer: TextTokenizer
    session: Any  # onnxruntime.InferenceSession (untyped)
    config: EngineConfig
    threads: int
    # Parts of the load (tokenizer and session overlap, so they add up to more than load_ms).
    load_timings_ms: dict[str, float] = field(default_factory=dict)
    load_ms: float = 0.0  # the whole load, wall clock
    cache: EmbedCache | None = None

    @classmethod
    def load(cls, model_dir: Path, config: EngineConfig | None = None) -> Engine:
        config = config or EngineConfig()
        model_dir = Path(model_dir)
        timings: dict[str, float] = {}
        start = t = time.perf_counter()
        manifest = load_manifest(model_dir)
        verify_files(model_dir, manifest, config.verify)
        timings["verify"] = _ms_since(t)

        # The session is built in a second thread while this one loads the tokenizer: the
        # tokenizer libraries hold the GIL for their whole load, onnxruntime releases it for most
        # of its own, so the two overlap on a 2-vCPU function instead of adding up.
        threads = config.threads or default_threads(config.cpu_limit)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="session") as pool:
            pending = pool.submit(_timed_session, model_dir, manifest, config, threads)
            t = time.perf_counter()
            tokenizer = TextTokenizer.load(model_dir, manifest)
            timings["tokenizer"] = _ms_since(t)
            session, timings["session"] = pending.result()
        missing = set(manifest.output_names) - {o.name for o in session.get_outputs()}
        if missing:
            raise ModelLoadError(
                f"{model_dir}: the graph lacks outputs {sorted(missing)} named in its manifest"
            )

        engine = cls(manifest, tokenizer, session, config, threads, timings)
        if (
            manifest.int8_weights == "s8"
            and session_device(session) == "cpu"
            and x86_without_vnni()
        ):
            log.warning(
                "%s: this x86 CPU has no VNNI, where int8 models built with s8 weights lose "
                "accuracy; rebuild with `python -m model_build --int8-weights u8`",
                manifest.model_id,
            )
        if config.warmup:
            t = time.perf_counter()
            engine.warm_up()
            timings["warmup"] = _ms_since(t)
        if config.cache_size > 0:  # after the warm-up, which is no one's input
            engine.cache = EmbedCache(config.cache_size, manifest.fingerprint)
        if config.release_heap:
            t = time.perf_counter()
            release_freed_heap()
            timings["release_heap"] = _ms_since(t)
        engine.load_ms = _ms_since(start)
        log.info(
            "loaded %s (%s, %s) from %s on %s with %d threads in %.0f ms",
            manifest.model_id,
            manifest.recipe,
            manifest.precision,
            model_dir,
            session_device(session),
            threads,
            engine.load_ms,
        )
        return engine

    # ---- description -------------------------------------------------------------------------

    @functools.cached_property
    def available_heads(self) -> tuple[str, ...]:
        # Cached: the manifest is fixed for the engine's life, and every request asks.
        return tuple(h for h in HEADS if h in self.manifest.output_names)

    def warm_up(self) -> None:
        """One run with every head: the first run of a shape plans memory, so it is paid here
        (at load, or before a SnapStart snapshot) and not by the first request."""
        self.encode(["warm-up"], **{h: True for h in self.available_heads})

    @property
    def embedding_ranges(self) -> Ranges | None:
        return Ranges.from_manifest(self.manifest.embedding_ranges, self.manifest.dims)

    @functools.cached_property
    def info(self) -> ModelInfo:
        # Cached: every request reads it, and nothing in it changes after the load (a session
        # rebuilt after a SnapStart restore is on the same device).
        source = self.manifest.source
        heads_ = self.available_heads
        return ModelInfo(
            id=self.manifest.model_id,
            aliases=self.manifest.aliases,
            dims=self.manifest.dims,
            max_length=self.manifest.max_length,
            vocab_size=self.manifest.vocab_size,
            capabilities=Capabilities(
                dense="dense" in heads_, sparse="sparse" in heads_, colbert="colbert" in heads_
            ),
            recipe=self.manifest.recipe,
            precision=self.manifest.precision,
            fingerprint=self.manifest.fingerprint,
            source=source.label,
            revision=source.revision,
            created=self.manifest.created,
            device=session_device(self.session),
        )

    # ---- encoding ------------------------------------------------------------------------------

    def token_strings(self, weights: Mapping[int, float]) -> dict[str, float]:
        return self.tokenizer.token_strings(weights)

    def tokens(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[TokenInfo]]:
        return self.tokenizer.tokens(texts, add_special_tokens=add_special_tokens)

    def decode(
        self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

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
        self.check_dimensions(dimensions)
        t = time.perf_counter()
        ids = self.tokenize(texts, max_length=max_length, truncate=truncate, max_tokens=max_tokens)
        encoded = self._run(ids, dense, sparse, colbert, tokenize_ms=_ms_since(t))
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
        self.check_dimensions(dimensions)
        t = time.perf_counter()
        checked = self.check_ids(
            ids, max_length=max_length, truncate=truncate, max_tokens=max_tokens
        )
        encoded = self._run(checked, dense, sparse, colbert, tokenize_ms=_ms_since(t))
        encoded.truncated = checked.truncated
        return heads.shortened(encoded, dimensions)

    # The steps of encode() one by one, for a caller that runs them in different threads
    # (handler/engine/microbatch.py: validate in the request's thread, run in a shared pass).

    def tokenize(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        truncate: bool = True,
        max_tokens: int | None = None,
    ) -> TokenBatch:
        """Token ids as encode() runs them; bad max_length, over-long inputs and a total over
        `max_tokens` raise here."""
        return self.tokenizer.encode(
            texts, max_length=self._limit(max_length), truncate=truncate, max_tokens=max_tokens
        )

    def check_ids(
        self,
        ids: Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
        truncate: bool = True,
        max_tokens: int | None = None,
    ) -> TokenBatch:
        """Token-id input checked and cut as encode_ids() runs it."""
        limit = self._limit(max_length)
        return self.tokenizer.check_ids(
            ids, max_length=limit, truncate=truncate, max_tokens=max_tokens
        )

    def check_dimensions(self, dimensions: int | None) -> None:
        """InputError unless `dimensions` fits this model's dense width."""
        heads.check_dimensions(dimensions, self.manifest.dims, self.manifest.model_id)

    def check_heads(self, dense: bool, sparse: bool, colbert: bool) -> None:
        """InputError / CapabilityError unless this model gives every head asked for."""
        self._wanted(dense, sparse, colbert)

    def run_ids(
        self,
        ids: list[list[int]],
        dense: bool,
        sparse: bool,
        colbert: bool,
        *,
        tokenize_ms: float = 0.0,
    ) -> Encoded:
        """One length-sorted run over ids that tokenize() or check_ids() gave."""
        return self._run(ids, dense, sparse, colbert, tokenize_ms=tokenize_ms)

    def _limit(self, max_length: int | None) -> int:
        if max_length is None:
            return self.manifest.max_length
        if max_length < 1:
            raise InputError("max_length must be positive", param="max_length")
        # Asking for more than the model was built for silently means the model's own limit.
        return min(max_length, self.manifest.max_length)

    def _wanted(self, dense: bool, sparse: bool, colbert: bool) -> list[str]:
        asked = [h for h, on in zip(HEADS, (dense, sparse, colbert), strict=True) if on]
        if not asked:
            raise InputError("ask for at least one of dense, sparse or colbert")
        missing = [h for h in asked if h not in self.available_heads]
        if missing:
            raise CapabilityError(
                f"model '{self.manifest.model_id}' has no {' or '.join(missing)} output "
                f"(it gives: {', '.join(self.available_heads)})",
                param=missing[0],
            )
        return asked

    def _run(
        self, ids: list[list[int]], dense: bool, sparse: bool, colbert: bool, *, tokenize_ms: float
    ) -> Encoded:
        """Rows with the same ids run once (the first of them) and the others share its outputs;
        with a cache, rows it holds do not run at all. `Encoded.sources` says which was which."""
        wanted = self._wanted(dense, sparse, colbert)
        n = len(ids)
        dense_out = np.zeros((n, self.manifest.dims), dtype=np.float32) if dense else None
        sparse_out: list[dict[int, float]] | None = [{} for _ in range(n)] if sparse else None
        colbert_out: list[FloatArray] | None = [np.empty(0, np.float32)] * n if colbert else None
        drop = set(self.manifest.special_tokens.values())
        pad_id = self.manifest.special_tokens["pad"]
        infer_ms = post_ms = 0.0

        lengths = [len(s) for s in ids]
        keys = [tuple(s) for s in ids]
        first = first_occurrences(keys)
        sources = [COMPUTED if first[i] == i else SHARED for i in range(n)]
        cache = self.cache
        if cache is not None:
            for i in range(n):
                entry = cache.get(keys[i], dense, sparse, colbert) if first[i] == i else None
                if entry is not None:
                    sources[i] = CACHED
                    if dense_out is not None and entry.dense is not None:
                        dense_out[i] = entry.dense
                    if sparse_out is not None and entry.sparse is not None:
                        sparse_out[i] = entry.sparse
        todo = [i for i in range(n) if sources[i] == COMPUTED]

        config = self.config
        for planned in plan_batches(
            [lengths[i] for i in todo],
            config.batch_token_budget,
            config.max_batch_size,
            config.attention_square_budget,
        ):
            batch = [todo[j] for j in planned]
            input_ids, mask = pad([ids[i] for i in batch], pad_id)
            t = time.perf_counter()
            # Only the heads asked for are fetched; the rest of the graph is shared.
            outputs = dict(
                zip(
                    wanted,
                    self.session.run(wanted, {"input_ids": input_ids, "attention_mask": mask}),
                    strict=True,
                )
            )
            infer_ms += _ms_since(t)
            t = time.perf_counter()
            for row, i in enumerate(batch):
                if dense_out is not None:
                    dense_out[i] = outputs["dense"][row]
                if sparse_out is not None:
                    sparse_out[i] = heads.sparse_weights(
                        input_ids[row, : lengths[i]], outputs["sparse"][row, : lengths[i]], drop
                    )
                if colbert_out is not None:
                    colbert_out[i] = heads.colbert_rows(outputs["colbert"][row], lengths[i])
                if cache is not None:
                    cache.put(
                        keys[i],
                        dense_out[i] if dense_out is not None else None,
                        sparse_out[i] if sparse_out is not None else None,
                    )
            post_ms += _ms_since(t)

        for i in range(n):
            if sources[i] == SHARED:
                j = first[i]
                if dense_out is not None:
                    dense_out[i] = dense_out[j]
                if sparse_out is not None:
                    sparse_out[i] = sparse_out[j]
                if colbert_out is not None:
                    colbert_out[i] = colbert_out[j]

        return Encoded(
            dense=dense_out,
            sparse=sparse_out,
            colbert=colbert_out,
            token_counts=lengths,
            timings_ms={"tokenize": tokenize_ms, "infer": infer_ms, "post": post_ms},
            sources=sources,
        )


def artifact_session(model_dir: Path, manifest: Manifest, device: Device, threads: int) -> Any:
    """A session for the artifact's graph, as its manifest says to build it (a graph optimized
    at build time loads without optimizing again): at load, and again after a SnapStart restore."""
    return create_session(
        model_dir / manifest.onnx_file,
        device=device,
        threads=threads,
        optimized=manifest.onnx.optimized,
    )


def _timed_session(
    model_dir: Path, manifest: Manifest, config: EngineConfig, threads: int
) -> tuple[Any, float]:
    t = time.perf_counter()
    try:
        session = artifact_session(model_dir, manifest, config.device, threads)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelLoadError(f"{model_dir / manifest.onnx_file}: cannot be loaded ({exc})") from exc
    return session, _ms_since(t)


def load_registry(paths: Sequence[Path], config: EngineConfig | None = None) -> ModelRegistry:
    """Load every model directory (MODEL_PATH may list several); the first is the default."""
    return ModelRegistry([Engine.load(Path(p), config) for p in paths])


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
