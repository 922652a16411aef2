"""`python -m bench`: prepare the models, run every stage for every engine, write the results.

    python -m bench [--smoke] [--engines ours-int8 ort-int8 ...] [--work-dir bench/work]
                    [--out bench/results] [--rebuild]
    python -m bench --job [--smoke]      # the corpus job figure only (bench/job.py)
    python -m bench.image_start --model DIR   # the cold start inside the Lambda image only

Full run (`make bench`): the full-size model (24 layers, hidden 1024, vocab 250,002), minutes and
about 13 GB of disk in the work directory (bge-m3-lite's build holds about 19 GiB of memory while
it calibrates); results in bench/results/<date>-<cpu>.{json,md,png} and
bench/results/latest.{md,png}. `--smoke` runs every stage on the tiny fixture (for CI: about a
minute on a quiet 2-core machine, engines three at a time), and by default writes under the work
directory so that it never replaces the real results. Ctrl-C or SIGTERM stops every worker and
writes nothing (exit 130), so an interrupted run never replaces the last complete one.

Last stage (where Docker is usable: root, dockerd; `--no-image-start` leaves it out): the cold
start inside the Lambda image built with the ours-int8 model, page cache warm and cold
(bench/image_start.py); the smoke run's on the tiny model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench import concurrency, image_start, report
from bench.common import (
    LAMBDA_ENV,
    REPO_ROOT,
    STOP,
    Json,
    load_average,
    machine_info,
    mem_available_mib,
    read_through,
    run_child,
    run_start_env,
    say,
)
from bench.prep import Artifact, Prep

ENGINES: dict[str, str] = {
    "ours-int8": "ours int8",
    "ours-fp32": "ours fp32",
    "ours-fp16": "ours fp16",
    "ort-fp32": "plain ORT fp32",
    "ort-int8": "plain ORT int8",
    "lite-int8": "bge-m3-lite int8",
    "flagembedding": "FlagEmbedding fp32",
}
KIND = {"ours": "ours", "ort": "ort", "lite": "lite", "flagembedding": "flagembedding"}
# Engines that run only on the full-size model, left out of smoke runs, with the reason.
FULL_ONLY = {
    "lite-int8": (
        "bge-m3-lite hard-codes BGE-M3's shape (hidden size 1024, 16 heads, 24 fused attention "
        "blocks), so it cannot run the tiny fixture; its tokenizer file and file digests are "
        "checked by tests/test_bench_lite.py"
    )
}
STAGES = report.STAGES


@dataclass(frozen=True)
class Mode:
    name: str
    size: str
    latency: tuple[tuple[str, int, int], ...]  # name, tokens, repetitions
    throughput: tuple[tuple[int, int], ...]  # texts, tokens each
    throughput_reps: int
    long_tokens: int
    concurrency: concurrency.Plan
    concurrency_tokens: int
    main_timeout_s: float
    long_timeout_s: float
    build_timeout_s: float
    prep_jobs: int
    # Engines measured at once. Full runs: one, or they would disturb each other's numbers;
    # smoke runs: several, since their numbers mean nothing and mostly wait on process start.
    engine_jobs: int = 1
    # Full runs time the long text in a fresh process of its own, so that its peak RSS is its
    # own. Smoke runs it in the main job's process: a second process would import everything
    # again (FlagEmbedding alone: 7 CPU-seconds) for a peak that means nothing on the tiny model.
    long_in_main_process: bool = False
    # The 9-token query through the Lambda handler and through uvicorn, each alternated with the
    # engine call alone (bench/overhead.py): requests each way.
    overhead_reps: int = 300
    # The cold start inside the Lambda image: rounds of (cold, warm, cold-model), and the limit for
    # the whole stage, the image's build included.
    image_rounds: int = 3
    image_timeout_s: float = 3600


FULL = Mode(
    name="full",
    size="full",
    latency=(("9 tokens", 9, 20), ("128 tokens", 128, 10), ("512 tokens", 512, 5)),
    throughput=((32, 128), (8, 512)),
    throughput_reps=3,
    long_tokens=8192,
    concurrency=concurrency.Plan(
        levels=(1, 4, 16),
        requests_per_client=4,
        min_requests=16,
        start_timeout_s=900,
        level_timeout_s=180,
        request_timeout_s=120,
    ),
    concurrency_tokens=128,
    main_timeout_s=2400,
    long_timeout_s=1200,
    build_timeout_s=3600,
    prep_jobs=1,  # full-size builds take several GB each: one at a time
)
SMOKE = Mode(
    name="smoke",
    size="tiny",
    latency=(("9 tokens", 9, 2), ("128 tokens", 128, 2), ("512 tokens", 512, 2)),
    throughput=((32, 128), (8, 512)),
    throughput_reps=1,
    long_tokens=1024,  # 8192 tokens materialise 1 GiB of attention scores even on the tiny model
    concurrency=concurrency.Plan(
        levels=(1, 4, 16),
        requests_per_client=1,
        min_requests=2,
        start_timeout_s=120,
        level_timeout_s=30,
        request_timeout_s=30,
    ),
    concurrency_tokens=128,
    main_timeout_s=300,
    long_timeout_s=300,
    build_timeout_s=600,
    prep_jobs=3,
    engine_jobs=3,
    long_in_main_process=True,
    overhead_reps=10,
    image_rounds=1,
    image_timeout_s=1800,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--smoke", action="store_true", help="every stage on the tiny fixture (CI; about a minute)"
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=None,
        metavar="ENGINE",
        help=f"any of {', '.join(ENGINES)} (space- or comma-separated; default: all, "
        f"but --smoke leaves out {', '.join(FULL_ONLY)})",
    )
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench" / "work")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: bench/results (smoke: WORK_DIR/results)"
    )
    parser.add_argument("--rebuild", action="store_true", help="ignore cached models")
    parser.add_argument(
        "--job",
        action="store_true",
        help="only the corpus job figure: batch CLI against an API client loop (bench/job.py)",
    )
    parser.add_argument(
        "--no-image-start",
        action="store_true",
        help="leave out the cold start inside the Lambda image (it builds the image with Docker)",
    )
    parser.add_argument(
        "--rss-cap-gib",
        type=float,
        default=None,
        help="kill a worker whose RSS passes this (default: available memory less 1.5 GiB)",
    )
    args = parser.parse_args(argv)
    if args.engines is None:
        args.engines = [e for e in ENGINES if not (args.smoke and e in FULL_ONLY)]
    names = [n for item in args.engines for n in item.split(",") if n]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    args.engines = list(dict.fromkeys(names))
    args.work_dir = args.work_dir.resolve()
    if args.out is None:
        args.out = args.work_dir / "results" if args.smoke else REPO_ROOT / "bench" / "results"
    args.out = args.out.resolve()
    return args


def kind_of(engine: str) -> str:
    return KIND[engine.split("-")[0]]


def _build_ours(prep: Prep, engine: str) -> tuple[str, Artifact]:
    return engine, prep.build_ours(engine.split("-")[1])


def _export_plain(prep: Prep) -> tuple[str, Artifact]:
    return "ort-fp32", prep.export_plain()


def prepare(mode: Mode, args: argparse.Namespace) -> tuple[Prep, dict[str, Artifact]]:
    prep = Prep(args.work_dir, mode.size, rebuild=args.rebuild, timeout_s=mode.build_timeout_s)
    source = prep.make_source()
    artifacts: dict[str, Artifact] = {}
    wanted = set(args.engines)
    if "flagembedding" in wanted:
        artifacts["flagembedding"] = source
    jobs = []
    with ThreadPoolExecutor(max_workers=mode.prep_jobs) as pool:
        if wanted & {"ort-fp32", "ort-int8"}:
            jobs.append(pool.submit(_export_plain, prep))
        for engine in args.engines:
            if engine.startswith("ours-"):
                jobs.append(pool.submit(_build_ours, prep, engine))
        for job in jobs:
            name, art = job.result()
            artifacts[name] = art
    if "ort-int8" in wanted:
        artifacts["ort-int8"] = prep.quantize_plain(artifacts["ort-fp32"])
    if "lite-int8" in wanted:
        artifacts["lite-int8"] = prep.build_lite()
    return prep, artifacts


def make_texts(mode: Mode, source: Path, path: Path) -> Json:
    from bench.texts import TokenTexts

    tt = TokenTexts(source / "tokenizer.json")
    doc: Json = {
        "tokenizer": str(source / "tokenizer.json"),
        "latency": [
            {"name": name, "tokens": tokens, "reps": reps, "text": tt.make(tokens, seed=tokens)}
            for name, tokens, reps in mode.latency
        ],
        "throughput": [
            {"name": f"{n}x{tokens}", "tokens_each": tokens, "texts": tt.many(n, tokens, seed=n)}
            for n, tokens in mode.throughput
        ],
        "long": {
            "name": f"{mode.long_tokens} tokens",
            "tokens": mode.long_tokens,
            "text": tt.make(mode.long_tokens, seed=7),
        },
        "concurrency": {
            "tokens": mode.concurrency_tokens,
            # one distinct text per request of the largest level (identical ones would be
            # computed once per pass), plus one for the route's first call
            "texts": [
                tt.make(mode.concurrency_tokens, seed=99 + i)
                for i in range(concurrency.requests(mode.concurrency) + 1)
            ],
        },
    }
    path.write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    return doc


def worker(
    engine: str, job: str, art: Artifact, source: Path, texts_file: Path, mode: Mode, cap: float
) -> Json:
    spec = {
        "engine": engine,
        "kind": kind_of(engine),
        "job": job,
        "artifact": str(art.path),
        "source": str(source),
        "texts_file": str(texts_file),
        "throughput_reps": mode.throughput_reps,
        "long_in_main_process": mode.long_in_main_process,
        "overhead_reps": mode.overhead_reps,
    }
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "MODEL_PATH": str(art.path),
        # As the Lambda image sets it (infra/lambda.Dockerfile): the build checked the digests.
        "MODEL_VERIFY": os.environ.get("MODEL_VERIFY", "size"),
        # Ours is timed through its Lambda handler, so with what Lambda sets (as the image test
        # runs it, infra/scripts/docker_lib.sh): Lambda's platform defaults, EMF metrics included.
        **(LAMBDA_ENV if kind_of(engine) == "ours" else {}),
        **run_start_env(),
        "BENCH_T0": repr(time.time()),
    }
    timeout = mode.main_timeout_s if job == "main" else mode.long_timeout_s
    outcome = run_child(
        [sys.executable, "-m", "bench.worker", json.dumps(spec)],
        env=env,
        timeout_s=timeout,
        rss_cap_mib=cap,
    )
    result = outcome.result or {}
    result["wall_s"] = round(outcome.wall_s, 2)
    result["parent_sampled_peak_rss_mib"] = outcome.peak_rss_mib
    if outcome.error:
        result["error"] = outcome.error
    return result


def rss_cap(args: argparse.Namespace) -> float:
    if args.rss_cap_gib:
        return float(args.rss_cap_gib) * 1024
    return max(mem_available_mib() - 1536.0, 1024.0)


def run_engine(
    engine: str,
    art: Artifact,
    source: Path,
    texts_file: Path,
    texts: Json,
    mode: Mode,
    args: argparse.Namespace,
) -> Json:
    res: Json = {"label": ENGINES[engine], "kind": kind_of(engine), "artifact": art.to_json()}
    if not art.ok:
        reason = f"no model: {art.error}"
        for stage in STAGES[1:]:
            res[stage] = {"error": reason}
        return res
    if STOP.is_set():
        return res
    res["page_cache_mib"] = round(read_through(art.path), 1)
    say("engine", f"{engine}: cold start, warm latency and throughput (one new process)")
    main = worker(engine, "main", art, source, texts_file, mode, rss_cap(args))
    res["threads"] = main.get("threads")
    for stage in ("cold_start", "warm_latency", "throughput"):
        res[stage] = main.get(stage) or {"error": main.get("error", "no result")}
    if main.get("overhead"):
        res["overhead"] = main["overhead"]
    res["main_job"] = {k: main.get(k) for k in ("wall_s", "parent_sampled_peak_rss_mib", "error")}
    if STOP.is_set():
        return res
    if mode.long_in_main_process:
        long = main
    else:
        say("engine", f"{engine}: one {mode.long_tokens}-token text (a fresh process)")
        long = worker(engine, "long", art, source, texts_file, mode, rss_cap(args))
    res["long_text"] = long.get("long_text") or {"error": long.get("error", "no result")}
    res["long_text"]["parent_sampled_peak_rss_mib"] = long.get("parent_sampled_peak_rss_mib")
    if STOP.is_set():
        return res
    if engine.startswith("ours-"):
        say("engine", f"{engine}: concurrency against uvicorn on 127.0.0.1")
        res["concurrency"] = concurrency.measure(
            art.path,
            texts["concurrency"]["texts"],
            texts["concurrency"]["tokens"],
            mode.concurrency,
            args.work_dir / "logs" / f"server-{mode.size}-{engine}.log",
        )
    else:
        res["concurrency"] = {"skipped": "a library, not a server: concurrency is for our app"}
    return res


def image_stage(mode: Mode, art: Artifact | None, args: argparse.Namespace) -> Json:
    """The cold start inside the Lambda image with the ours-int8 model, or why not."""
    if args.no_image_start:
        return {"skipped": "--no-image-start"}
    if art is None:
        return {"skipped": "ours-int8 is not among the engines"}
    if not art.ok:
        return {"skipped": f"no ours-int8 model: {art.error}"}
    if STOP.is_set():
        return {"skipped": "interrupted"}
    return image_start.measure(art.path, rounds=mode.image_rounds, timeout_s=mode.image_timeout_s)


def output_stem(doc: Json) -> str:
    cpu = re.sub(r"[^a-z0-9]+", "-", doc["machine"]["cpu"].lower()).strip("-")[:40] or "cpu"
    stem = f"{doc['date'][:10]}-{cpu}-{doc['machine']['cores']}c"
    return stem + ("-smoke" if doc["mode"] == "smoke" else "")


def write_outputs(doc: Json, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(doc)
    png = out / f"{stem}.png"
    written = []
    try:
        report.plot(doc, png)
        shutil.copyfile(png, out / "latest.png")
        written += [png, out / "latest.png"]
        plot_ok = True
    except Exception as exc:  # a missing plot must not lose the numbers
        doc["plot_error"] = repr(exc)
        say("report", f"the plot failed: {exc!r}")
        plot_ok = False
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (out / f"{stem}.md").write_text(report.markdown(doc, f"{stem}.png" if plot_ok else None))
    (out / "latest.md").write_text(report.markdown(doc, "latest.png" if plot_ok else None))
    (out / "latest.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    written += [out / f"{stem}.json", out / f"{stem}.md", out / "latest.md", out / "latest.json"]
    return written


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM set STOP: workers and builds are stopped (bench.common.run_child,
    bench.prep), no new one starts, and main writes nothing."""

    def handler(signum: int, _frame: object) -> None:
        if not STOP.is_set():
            name = signal.Signals(signum).name
            say("stop", f"{name}: stopping the workers; no results will be written")
        STOP.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job:
        from bench import job

        return job.main(args.smoke, args.work_dir, args.out, args.rebuild)
    stop_on_signals()
    mode = SMOKE if args.smoke else FULL
    start = time.monotonic()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    say(
        "start",
        f"{mode.name} run: {', '.join(args.engines)}; {machine['cpu']}, {machine['cores']} cores, "
        f"onnxruntime {machine['versions']['onnxruntime']}; work dir {args.work_dir}",
    )
    doc: Json = {
        "schema": 1,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": mode.name,
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "load_average": {"before": load_average()},
        "config": {
            "model": (
                "full: 24 layers, hidden 1024, vocab 250,002"
                if mode.size == "full"
                else "tiny: 2 layers, hidden 32, vocab 250,002"
            ),
            "latency": [{"name": n, "tokens": t, "reps": r} for n, t, r in mode.latency],
            "throughput": [
                {"name": f"{n}x{t}", "texts": n, "tokens_each": t} for n, t in mode.throughput
            ],
            "throughput_reps": mode.throughput_reps,
            "overhead_reps": mode.overhead_reps,
            "long": {"name": f"{mode.long_tokens} tokens", "tokens": mode.long_tokens},
            "concurrency": {
                "levels": list(mode.concurrency.levels),
                "requests_per_client": mode.concurrency.requests_per_client,
                "min_requests": mode.concurrency.min_requests,
                "tokens_per_request": mode.concurrency_tokens,
            },
            "heads": ["dense", "sparse", "colbert"],
        },
        "engines": {},
        "skipped_engines": {ENGINES[e]: why for e, why in FULL_ONLY.items() if mode is SMOKE},
    }

    for name, why in doc["skipped_engines"].items():
        say("start", f"{name}: not run: {why}")
    say("prep", f"models ({mode.size}) in {args.work_dir}")
    prep, artifacts = prepare(mode, args)
    doc["source"] = prep.source.to_json()
    if not prep.source.ok:
        say("prep", f"cannot make the source model: {prep.source.error}")
    else:
        texts_file = args.work_dir / f"texts-{mode.size}.json"
        texts = make_texts(mode, prep.source.path, texts_file)
        say("texts", f"exact token counts checked with the model's tokenizer -> {texts_file}")
        with ThreadPoolExecutor(max_workers=mode.engine_jobs) as pool:
            source = prep.source.path
            # The slowest (torch imports, twice) first, so that it does not start last.
            order = sorted(args.engines, key=lambda e: e != "flagembedding")
            runs = {
                e: pool.submit(run_engine, e, artifacts[e], source, texts_file, texts, mode, args)
                for e in order
            }
        doc["engines"] = {engine: runs[engine].result() for engine in args.engines}
        # Last, alone: the image's build and its cold runs would disturb every other figure.
        doc["image_start"] = image_stage(mode, artifacts.get("ours-int8"), args)
        if doc["image_start"].get("skipped"):
            say("image", f"skipped: {doc['image_start']['skipped']}")

    if STOP.is_set():
        say("stop", f"interrupted: nothing written to {args.out}")
        return 130
    doc["load_average"]["after"] = load_average()
    doc["ratios"] = report.ratios(doc) if doc["engines"] else {}
    doc["targets"] = report.targets(doc) if doc["engines"] else []
    doc["wall_s"] = round(time.monotonic() - start, 1)
    written = write_outputs(doc, args.out)
    failures = [
        f"{engine}/{stage}"
        for engine, res in doc["engines"].items()
        for stage in STAGES
        if isinstance(res.get(stage), dict) and res[stage].get("error")
    ]
    if isinstance(doc.get("image_start"), dict) and doc["image_start"].get("error"):
        failures.append("image_start")
    say("done", f"{doc['wall_s']:.0f}s; wrote {', '.join(str(p) for p in written)}")
    if failures or not prep.source.ok:
        say("done", f"with errors in: {', '.join(failures) or 'the source model'}")
        return 1
    return 0
