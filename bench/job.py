"""`python -m bench --job`: a corpus embedded two ways in the same run, on the same model.

1. the job path: `python -m handler.batch corpus.jsonl out/ --dense --sparse` (one process, Parquet
   parts), timed from its own summary (reading, embedding, writing; the model load excluded) and
   from the outside (the whole process);
2. the API path: `python -m handler.main` (uvicorn) on 127.0.0.1 and one client sending the corpus
   in order as POST /embeddings requests of B passages (dense + sparse): each B in the plan on the
   first `probe_passages`, then the best B on the whole corpus, which is the API's figure.

Rows/s and tokens/s for both, and their ratio, plus tokens per CPU-second of the process that
embeds (the CLI, or the server): the figure cost estimates scale from, and one that a busy machine
disturbs far less than wall time. Full size (`python -m bench --job`): the full-size int8 model
and two thousand passages of 64 to 256 tokens; about 15 minutes on 2 cores. `--smoke` does the
same on the tiny fixture: its numbers show the mode works, not how fast anything is. Results go to
OUT/job-<date>-<cpu>[-smoke].json and .md, never over latest.json.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO_ROOT, Json, machine_info, say
from bench.concurrency import HOST, served
from bench.prep import Prep


@dataclass(frozen=True)
class JobPlan:
    size: str
    passages: int
    min_tokens: int
    max_tokens: int
    batch_sizes: tuple[int, ...]
    probe_passages: int  # the API's batch sizes are compared on this many, the best runs them all
    rows_per_part: int
    timeout_s: float


FULL_JOB = JobPlan("full", 2000, 64, 256, (8, 32, 128), 256, 500, 3600)
SMOKE_JOB = JobPlan("tiny", 2000, 16, 128, (8, 32, 128), 512, 500, 600)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_corpus(plan: JobPlan, source: Path, path: Path) -> int:
    """Passages of exact, seeded token counts between min and max; returns the total tokens."""
    from bench.texts import TokenTexts

    tt = TokenTexts(source / "tokenizer.json")
    rng = random.Random(16)
    total = 0
    with path.open("w", encoding="utf-8") as f:
        for i in range(plan.passages):
            tokens = rng.randint(plan.min_tokens, plan.max_tokens)
            total += tokens
            record = {"id": f"p{i}", "text": tt.make(tokens, seed=100_000 + i)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return total


def run_cli(model: Path, corpus: Path, out: Path, plan: JobPlan) -> Json:
    env = {**os.environ, "MODEL_PATH": str(model), "MODEL_VERIFY": "size", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "handler.batch", str(corpus), str(out), "--dense", "--sparse",
           "--rows-per-part", str(plan.rows_per_part)]  # fmt: skip
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=plan.timeout_s
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - start
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}
    summary: Json = json.loads(proc.stdout.strip().splitlines()[-1])
    parts = sorted(out.glob("part-*.parquet"))
    return {
        "rows": summary["rows"],
        "tokens": summary["tokens"],
        "seconds": summary["seconds"],
        "rows_per_s": summary["rows_per_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "process_wall_s": round(wall, 2),
        # the whole process (model load and imports included), so a little below the embedding's own
        "process_cpu_s": round(cpu_s, 2),
        "tokens_per_cpu_s": round(summary["tokens"] / cpu_s, 1),
        "parts": len(parts),
        "parquet_mib": round(sum(p.stat().st_size for p in parts) / 2**20, 2),
    }


def _post(conn: http.client.HTTPConnection, texts: list[str]) -> int:
    body = json.dumps(
        {"input": texts, "input_type": {"dense": True, "sparse": True}, "sparse_format": "id"}
    ).encode()
    conn.request("POST", "/embeddings", body=body, headers={"content-type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(f"POST /embeddings answered {response.status}: {payload[:300]!r}")
    tokens: int = json.loads(payload)["usage"]["total_tokens"]
    return tokens


def run_api(model: Path, texts: list[str], plan: JobPlan, log_file: Path) -> Json:
    """One client, requests one after another: what a user's indexing loop does."""
    result: Json = {"batch_sizes": {}}
    try:
        with served(model, log_file, 300) as (pid, port, _start_s):
            conn = http.client.HTTPConnection(HOST, port, timeout=plan.timeout_s)
            _post(conn, texts[:1])  # the route's first call
            probe = texts[: plan.probe_passages]
            for size in plan.batch_sizes:
                result["batch_sizes"][str(size)] = _api_pass(conn, probe, size, pid)
                say("job", f"API, batches of {size}, first {len(probe)}: "
                    f"{result['batch_sizes'][str(size)]['rows_per_s']} rows/s")  # fmt: skip
            sizes = result["batch_sizes"]
            best = max(sizes, key=lambda b: sizes[b]["tokens_per_s"])
            result["best_batch_size"] = int(best)
            result["best"] = _api_pass(conn, texts, int(best), pid)
            rate = result["best"]["rows_per_s"]
            say("job", f"API, batches of {best}, whole corpus: {rate} rows/s")
            conn.close()
    except Exception as exc:
        result["error"] = f"{exc}; server log: {log_file}"
    return result


def _api_pass(conn: http.client.HTTPConnection, texts: list[str], size: int, pid: int) -> Json:
    cpu_before = process_cpu_s(pid)
    start = time.perf_counter()
    tokens = sum(_post(conn, texts[i : i + size]) for i in range(0, len(texts), size))
    seconds = time.perf_counter() - start
    cpu_s = process_cpu_s(pid) - cpu_before
    return {
        "rows": len(texts),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "rows_per_s": round(len(texts) / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "server_cpu_s": round(cpu_s, 2),
        "tokens_per_cpu_s": round(tokens / cpu_s, 1) if cpu_s > 0 else None,
    }


def markdown(doc: Json) -> str:
    cli, api = doc["cli"], doc["api"]
    lines = [
        f"# Corpus job figure ({doc['mode']}, {doc['date'][:10]})",
        "",
        f"{doc['corpus']['passages']} passages, {doc['corpus']['tokens']} tokens "
        f"({doc['corpus']['min_tokens']}-{doc['corpus']['max_tokens']} each), model "
        f"{doc['model']}, dense + sparse; {doc['machine']['cpu']}, "
        f"{doc['machine']['cores']} cores.",
        "",
        "| path | passages | rows/s | tokens/s | tokens per CPU-second |",
        "|---|---:|---:|---:|---:|",
    ]
    if "error" not in cli:
        lines.append(f"| CLI (`python -m handler.batch`, Parquet) | {cli['rows']} | "
                     f"{cli['rows_per_s']} | {cli['tokens_per_s']} | "
                     f"{cli['tokens_per_cpu_s']} |")  # fmt: skip
    runs = [(f"{size} per request", r) for size, r in api.get("batch_sizes", {}).items()]
    if api.get("best"):
        runs.append((f"{api['best_batch_size']} per request (best), whole corpus", api["best"]))
    for label, r in runs:
        lines.append(f"| API, one client, {label} | {r['rows']} | {r['rows_per_s']} | "
                     f"{r['tokens_per_s']} | {r['tokens_per_cpu_s']} |")  # fmt: skip
    if doc.get("cli_over_best_api") is not None:
        lines += ["", f"CLI / best API batch: {doc['cli_over_best_api']}x tokens/s."]
    if doc["mode"] == "smoke":
        lines += ["", "Smoke run on the tiny random-weight model: the numbers show that the mode "
                  "works, not how fast either path is."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(smoke: bool, work_dir: Path, out: Path, rebuild: bool) -> int:
    plan = SMOKE_JOB if smoke else FULL_JOB
    mode = "smoke" if smoke else "full"
    work_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    prep = Prep(work_dir, plan.size, rebuild=rebuild, timeout_s=3600)
    source = prep.make_source()
    model = prep.build_ours("int8")
    if not (source.ok and model.ok):
        say("job", f"no model: {source.error or model.error}")
        return 1
    corpus = work_dir / f"job-corpus-{plan.size}.jsonl"
    total_tokens = make_corpus(plan, source.path, corpus)
    texts = [json.loads(line)["text"] for line in corpus.read_text("utf-8").splitlines()]
    say("job", f"corpus: {len(texts)} passages, {total_tokens} tokens -> {corpus}")
    parts = work_dir / f"job-out-{plan.size}"
    for old in parts.glob("*"):
        old.unlink()  # a fresh output: a re-run must embed, not skip
    say("job", "CLI: python -m handler.batch")
    cli = run_cli(model.path, corpus, parts, plan)
    say("job", f"CLI: {cli.get('rows_per_s')} rows/s, {cli.get('tokens_per_s')} tokens/s")
    api = run_api(model.path, texts, plan, work_dir / "logs" / f"job-server-{plan.size}.log")
    doc: Json = {
        "schema": 1,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "command": "python -m bench --job" + (" --smoke" if smoke else ""),
        "machine": machine,
        "model": f"{plan.size} int8 ({model.path.name})",
        "corpus": {
            "passages": len(texts),
            "tokens": total_tokens,
            "min_tokens": plan.min_tokens,
            "max_tokens": plan.max_tokens,
        },
        "cli": cli,
        "api": api,
    }
    if "error" not in cli and api.get("best"):
        doc["cli_over_best_api"] = round(cli["tokens_per_s"] / api["best"]["tokens_per_s"], 2)
    out.mkdir(parents=True, exist_ok=True)
    cpu = re.sub(r"[^a-z0-9]+", "-", machine["cpu"].lower()).strip("-")[:40] or "cpu"
    stem = f"job-{doc['date'][:10]}-{cpu}-{machine['cores']}c" + ("-smoke" if smoke else "")
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (out / f"{stem}.md").write_text(markdown(doc))
    say("job", f"wrote {out / stem}.json and .md")
    sys.stdout.write(markdown(doc))
    return 0 if "error" not in cli and "error" not in api else 1
