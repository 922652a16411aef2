"""One measurement job in a fresh process: `python -m bench.worker SPEC_JSON`.

Jobs:
- `main`: cold start (new process -> first embedding; for our builds the first 200 response of
  the Lambda handler, invoked in-process the way Lambda's runtime does), then warm latency and
  batch throughput in the same, now warm, process (smoke runs: then the long text too);
- `long`: start the same way, then one long text (8192 tokens in the full run): its time and the
  process's peak RSS;
- `cold`: the cold start alone (ours), the query given in the spec: what bench/image_start.py runs
  inside the Lambda image, where only the standard library, the handler and bench/ are present.

Only the standard library is imported before the clock starts; the parent passes its own
`time.time()` just before it spawned us (BENCH_T0), so interpreter start-up is counted too. The
result is one `BENCH_RESULT {json}` line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import functools
import gc
import importlib
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from bench.common import (
    MIB,
    Json,
    cpu_seconds,
    emit_result,
    ms_since,
    peak_rss_mib,
    rss_mib,
    say,
    summarize_ms,
)

EVENT_FILE = Path(__file__).with_name("events") / "function_url_post_iam.json"
HEADS = ("dense", "sparse", "colbert")
SPECIAL_IDS = (0, 1, 2, 3)  # <s> <pad> </s> <unk>: dropped from sparse weights
PAD_ID = 1
MAX_TOKENS = 8192


class Runner(Protocol):
    threads: int | None

    def encode(self, texts: Sequence[str]) -> int:
        """Embed `texts` (dense, sparse and ColBERT) and return the tokens processed."""
        ...


# ---- our builds, through the Lambda handler --------------------------------------------------


class LambdaContext:
    """What Mangum reads from Lambda's context object."""

    function_name = "bge-m3-bench"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bge-m3-bench"
    memory_limit_in_mb = 10240
    aws_request_id = "bench-request"
    log_group_name = "/aws/lambda/bge-m3-bench"
    log_stream_name = "bench"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


def lambda_event(texts: Sequence[str]) -> Json:
    event: Json = json.loads(EVENT_FILE.read_text())
    event["body"] = json.dumps(
        {"input": list(texts), "model": "bge-m3", "encoding_format": "float"}
    )
    return event


def find_engines() -> list[Any]:
    """Every loaded Engine in this process, wherever the handler keeps it (a module global, a
    cached getter, a registry): found by type, so the benchmark does not depend on the name."""
    from handler.engine import Engine

    found: list[Any] = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, Engine):
                found.append(obj)
        except Exception:  # an object with a broken __class__ is not ours
            continue
    return found


class OursRunner:
    def __init__(self, engine: Any, handler: Callable[[Json, Any], Json]):
        self.engine = engine
        self.handler = handler
        self.threads: int | None = int(engine.threads)

    def encode(self, texts: Sequence[str]) -> int:
        out = self.engine.encode(list(texts), dense=True, sparse=True, colbert=True)
        return int(out.total_tokens)

    def invoke(self, texts: Sequence[str]) -> Json:
        response = self.handler(lambda_event(texts), LambdaContext())
        status = response.get("statusCode")
        if status != 200:
            raise RuntimeError(f"the Lambda handler answered {status}: {response.get('body')}")
        return response


def start_ours(spec: Json, query: str) -> tuple[OursRunner, Json]:
    t = time.perf_counter()
    module = importlib.import_module("handler.lambda_function")
    import_ms = ms_since(t)
    rss_after_import = rss_mib()
    engines = find_engines()
    loaded_at_import = bool(engines)
    handler = module.handler

    t = time.perf_counter()
    response = handler(lambda_event([query]), LambdaContext())
    first_ms = ms_since(t)
    rss_after_first = rss_mib()
    if response.get("statusCode") != 200:
        raise RuntimeError(
            f"first request: the Lambda handler answered {response.get('statusCode')}: "
            f"{str(response.get('body'))[:500]}"
        )
    body = json.loads(response["body"])
    dims = len(body["data"][0]["embedding"])
    engines = engines or find_engines()
    if not engines:
        raise RuntimeError("no handler.engine.Engine found in the process after the first request")
    engine = engines[0]
    timings = {k: float(v) for k, v in engine.load_timings_ms.items()}
    # Wall clock: the tokenizer and the session load in parallel, so their sum overstates it.
    load_ms = float(getattr(engine, "load_ms", 0.0)) or sum(timings.values())
    cold = {
        "path": "Lambda handler (Mangum, Function URL event) -> POST /v1/embeddings -> 200",
        "engine_loaded": "at import" if loaded_at_import else "on the first request",
        # At import the load runs in a thread beside the app's imports: what is left is the
        # import time the load did not hide.
        "imports_ms": import_ms - (load_ms if loaded_at_import else 0.0),
        "verify_ms": timings.get("verify"),
        "tokenizer_ms": timings.get("tokenizer"),
        "session_ms": timings.get("session"),
        "warmup_ms": timings.get("warmup"),
        "load_ms": load_ms,
        "first_request_ms": first_ms - (0.0 if loaded_at_import else load_ms),
        "rss_after_load_mib": rss_after_import if loaded_at_import else rss_after_first,
        "rss_after_first_mib": rss_after_first,
        "dims": dims,
        "engines_found": len(engines),
        "precision": engine.manifest.precision,
        "verify_mode": engine.config.verify,
        "batch_token_budget": engine.config.batch_token_budget,
    }
    return OursRunner(engine, handler), cold


# ---- plain onnxruntime ----------------------------------------------------------------------


class OrtRunner:
    """What anyone gets from the export: default session options, one padded batch per call."""

    def __init__(self, tokenizer: Any, session: Any):
        self.tokenizer = tokenizer
        self.session = session
        threads = session.get_session_options().intra_op_num_threads
        self.threads = int(threads) or None  # 0: onnxruntime's default (physical cores)

    def encode(self, texts: Sequence[str]) -> int:
        import numpy as np

        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        _dense, sparse, colbert = self.session.run(
            list(HEADS), {"input_ids": ids, "attention_mask": mask}
        )
        lengths = mask.sum(axis=1)
        for row, length in enumerate(lengths):  # the same per-text output as FlagEmbedding
            tokens, weights = ids[row, :length], sparse[row, :length]
            keep = (weights > 0) & ~np.isin(tokens, SPECIAL_IDS)
            lexical: dict[int, float] = {}
            for token, weight in zip(tokens[keep].tolist(), weights[keep].tolist(), strict=True):
                lexical[token] = max(weight, lexical.get(token, 0.0))
            _ = colbert[row, : length - 1]
        return int(lengths.sum())


def start_ort(spec: Json, query: str) -> tuple[OrtRunner, Json]:
    artifact = Path(spec["artifact"])
    t = time.perf_counter()
    import onnxruntime as ort
    from tokenizers import Tokenizer

    import_ms = ms_since(t)
    t = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token="<pad>")
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    tokenizer_ms = ms_since(t)
    t = time.perf_counter()
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    session_ms = ms_since(t)
    rss_after_load = rss_mib()
    runner = OrtRunner(tokenizer, session)
    t = time.perf_counter()
    runner.encode([query])
    first_ms = ms_since(t)
    return runner, {
        "path": "new process -> first embedding (tokenizers + InferenceSession, defaults)",
        "imports_ms": import_ms,
        "verify_ms": None,
        "tokenizer_ms": tokenizer_ms,
        "session_ms": session_ms,
        "warmup_ms": None,
        "load_ms": tokenizer_ms + session_ms,
        "first_request_ms": first_ms,
        "rss_after_load_mib": rss_after_load,
        "rss_after_first_mib": rss_mib(),
    }


# ---- FlagEmbedding --------------------------------------------------------------------------


class FlagRunner:
    def __init__(self, model: Any):
        import torch

        self.model = model
        self.threads: int | None = torch.get_num_threads()

    def encode(self, texts: Sequence[str]) -> int:
        out = self.model.encode(
            list(texts),
            # One batch for all texts; one more than their number also turns its progress bars off.
            batch_size=len(texts) + 1,
            max_length=MAX_TOKENS,
            return_dense=True,
            return_sparse=True,
            return_colbert_vecs=True,
        )
        # ColBERT keeps one row per token after <s>, so its rows + 1 are the tokens of each text.
        return sum(len(v) + 1 for v in out["colbert_vecs"])


def start_flag(spec: Json, query: str) -> tuple[FlagRunner, Json]:
    t = time.perf_counter()
    from FlagEmbedding import BGEM3FlagModel

    import_ms = ms_since(t)
    return start_library(
        "BGEM3FlagModel, torch fp32",
        import_ms,
        lambda: FlagRunner(BGEM3FlagModel(spec["source"], use_fp16=False, devices="cpu")),
        query,
    )


def start_library(
    what: str, import_ms: float, load: Callable[[], Runner], query: str
) -> tuple[Any, Json]:
    """A baseline that is a Python library: its load is one call, so the cold start has no
    tokenizer / session split."""
    t = time.perf_counter()
    runner = load()
    load_ms = ms_since(t)
    rss_after_load = rss_mib()
    t = time.perf_counter()
    runner.encode([query])
    first_ms = ms_since(t)
    return runner, {
        "path": f"new process -> first embedding ({what})",
        "imports_ms": import_ms,
        "verify_ms": None,
        "tokenizer_ms": None,
        "session_ms": None,
        "warmup_ms": None,
        "load_ms": load_ms,
        "first_request_ms": first_ms,
        "rss_after_load_mib": rss_after_load,
        "rss_after_first_mib": rss_mib(),
    }


# ---- bge-m3-lite ------------------------------------------------------------------------------


class LiteRunner:
    def __init__(self, embedder: Any):
        self.embedder = embedder
        threads = embedder.backbone.session.get_session_options().intra_op_num_threads
        self.threads: int | None = int(threads) or None  # 0: onnxruntime's default

    def encode(self, texts: Sequence[str]) -> int:
        out = self.embedder.encode(
            list(texts),
            batch_size=len(texts),
            max_length=MAX_TOKENS,
            return_dense=True,
            return_sparse=True,
            return_colbert_vecs=True,
        )
        return sum(len(v) + 1 for v in out["colbert_vecs"])  # as FlagRunner counts them


def start_lite(spec: Json, query: str) -> tuple[LiteRunner, Json]:
    artifact = Path(spec["artifact"])
    os.environ["BGE_M3_LITE_OFFLINE"] = "1"  # never download: every file is in the artifact
    t = time.perf_counter()
    from bge_m3_lite import BGEM3Embedder, hub

    from bench.lite import ACCEPTED_FILE, MODEL_FILE, accept_files

    import_ms = ms_since(t)
    accept_files(hub, json.loads((artifact / ACCEPTED_FILE).read_text()))
    return start_library(
        "BGEM3Embedder, precision int8",
        import_ms,
        lambda: LiteRunner(
            BGEM3Embedder(artifact, precision="int8", model_path=artifact / MODEL_FILE, quiet=True)
        ),
        query,
    )


STARTERS: dict[str, Callable[[Json, str], tuple[Any, Json]]] = {
    "ours": start_ours,
    "ort": start_ort,
    "flagembedding": start_flag,
    "lite": start_lite,
}


# ---- measurements -----------------------------------------------------------------------------


def timed_reps(fn: Callable[[], object], reps: int) -> list[float]:
    fn()  # the first run of a shape plans memory: not what a warm request pays
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(ms_since(t))
    return samples


def warm_latency(runner: Any, items: list[Json], engine: str) -> Json:
    out: Json = {}
    for item in items:
        samples = timed_reps(functools.partial(runner.encode, [item["text"]]), int(item["reps"]))
        out[item["name"]] = {"tokens": item["tokens"], **summarize_ms(samples)}
        say(
            "latency",
            f"{engine}: {item['name']}: p50 {out[item['name']]['p50_ms']:.1f} ms, "
            f"p95 {out[item['name']]['p95_ms']:.1f} ms ({len(samples)} runs)",
        )
    if isinstance(runner, OursRunner) and items:
        query = items[0]
        samples = timed_reps(functools.partial(runner.invoke, [query["text"]]), int(query["reps"]))
        out["handler_" + query["name"]] = {
            "tokens": query["tokens"],
            "what": "Lambda handler round trip, /v1/embeddings (dense only)",
            **summarize_ms(samples),
        }
    return out


def throughput(runner: Any, batches: list[Json], reps: int, engine: str) -> Json:
    out: Json = {}
    for batch in batches:
        texts = batch["texts"]
        runner.encode(texts)  # warm-up: this shape's first run
        rates, cpu, tokens = [], [], 0
        for _ in range(reps):
            c, t = cpu_seconds(), time.perf_counter()
            tokens = runner.encode(texts)
            seconds = time.perf_counter() - t
            rates.append(tokens / seconds)
            cpu.append(cpu_seconds() - c)
        rates.sort()
        out[batch["name"]] = {
            "texts": len(texts),
            "tokens": tokens,
            "tokens_per_s": round(rates[len(rates) // 2], 1),
            "best_tokens_per_s": round(rates[-1], 1),
            "runs_tokens_per_s": [round(r, 1) for r in rates],
            # CPU time is steadier than wall time on a shared machine.
            "tokens_per_cpu_s": round(tokens * len(cpu) / max(sum(cpu), 1e-9), 1),
        }
        say("throughput", f"{engine}: {batch['name']}: {rates[len(rates) // 2]:.0f} tok/s")
    return out


def long_text(runner: Any, item: Json, engine: str) -> Json:
    hwm_before = peak_rss_mib()
    rss_before = rss_mib()
    t = time.perf_counter()
    tokens = runner.encode([item["text"]])
    seconds = time.perf_counter() - t
    result = {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_before_mib": round(hwm_before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_after_mib": round(rss_mib(), 1),
    }
    say(
        "long",
        f"{engine}: {item['name']}: {seconds:.1f} s, peak RSS"
        f" {result['peak_rss_mib'] / 1024:.2f} GiB",
    )
    return result


def overhead(runner: OursRunner, query: str, reps: int, engine: str) -> Json:
    """The path around the model for the 9-token query, measured one way for both hosts."""
    from bench import overhead as oh
    from handler.main import settings

    out: Json = {"lambda": oh.lambda_overhead(runner.handler, runner.engine, settings, query, reps)}
    # The same handler calls one after another: each follows only its predecessor's forward pass,
    # as in a warm Lambda environment serving request after request (docs/overhead.md).
    out["lambda_back_to_back"] = oh.lambda_overhead(
        runner.handler, runner.engine, settings, query, reps, alternate=False
    )
    env = {k: v for k, v in os.environ.items() if k not in ("BENCH_T0",)}
    out["uvicorn"] = oh.uvicorn_overhead(runner.engine, settings, query, reps, env)
    for host, figures in out.items():
        say(
            "overhead",
            f"{engine}: {host}: p50 {figures['handler_p50_ms']:.2f} - engine "
            f"{figures['engine_p50_ms']:.2f} = {figures['p50_difference_ms']:.2f} ms; wall minus "
            f"stages p50 {figures['wall_minus_stages_p50_ms']:.2f} ms",
        )
    return out


def run(spec: Json, t0: float) -> Json:
    engine, kind, job = spec["engine"], spec["kind"], spec["job"]
    # The `cold` job (the cold start alone, inside the Lambda image: bench/image_start.py) gets
    # its query in the spec, since the texts file lives on the host.
    texts: Json = json.loads(Path(spec["texts_file"]).read_text()) if job != "cold" else {}
    query = spec["query"] if job == "cold" else texts["latency"][0]["text"]
    started = time.time()
    runner, cold = STARTERS[kind](spec, query)
    cold = {k: round(v, 3) if isinstance(v, float) else v for k, v in cold.items()}
    cold["interpreter_ms"] = round((started - t0) * 1000.0, 3)
    cold["total_ms"] = round((time.time() - t0) * 1000.0, 3)
    cold["peak_rss_mib"] = round(peak_rss_mib(), 1)
    # CPU time suffers less than wall time from a shared machine's load; the blocks read from
    # disk tell a start that found its files in the page cache from one that did not.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cold["cpu_ms"] = round((usage.ru_utime + usage.ru_stime) * 1000.0, 1)
    cold["disk_read_mib"] = round(usage.ru_inblock * 512 / MIB, 1)
    # Epoch seconds of the start: a container's clock is the host's, so the host can tell how
    # long the container took to get here.
    cold["t0_epoch_s"] = t0
    result: Json = {"engine": engine, "job": job, "threads": runner.threads}
    if job == "cold":
        result["cold_start"] = cold
    elif job == "main":
        say(
            "cold",
            f"{engine}: first response {cold['total_ms'] / 1000:.2f} s after spawn, "
            f"RSS after load {cold['rss_after_load_mib']:.0f} MiB",
        )
        result["cold_start"] = cold
        result["warm_latency"] = warm_latency(runner, texts["latency"], engine)
        result["throughput"] = throughput(
            runner, texts["throughput"], int(spec["throughput_reps"]), engine
        )
        if kind == "ours" and spec.get("overhead_reps"):
            result["overhead"] = overhead(runner, query, int(spec["overhead_reps"]), engine)
        if spec.get("long_in_main_process"):
            result["long_text"] = long_text(runner, texts["long"], engine)
            result["long_text"]["process"] = "the main job's (smoke: its peak includes the rest)"
    elif job == "long":
        result["start"] = cold
        result["long_text"] = long_text(runner, texts["long"], engine)
    else:
        raise ValueError(f"unknown job {job!r}")
    return result


def main(argv: list[str] | None = None) -> int:
    t0 = float(os.environ.get("BENCH_T0") or time.time())
    args = sys.argv[1:] if argv is None else argv
    spec: Json = json.loads(args[0])
    try:
        result = run(spec, t0)
    except BaseException as exc:  # the parent records the reason and goes on with the rest
        traceback.print_exc()
        emit_result({"engine": spec.get("engine"), "job": spec.get("job"), "error": repr(exc)})
        return 1
    emit_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
