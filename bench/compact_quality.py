"""What compact embedding types cost in retrieval quality, with and without rescoring.

    python -m bench.compact_quality --model DIR --data BEIR_DIR [--candidates 40]

`DIR` is an artifact made by `python -m model_build` (with the `embedding_ranges` section; add it
to an older one with `python -m model_build.ranges DIR`); `BEIR_DIR` holds a retrieval set in
BEIR's layout: corpus.jsonl ({_id, title, text}), queries.jsonl ({_id, text}) and
qrels/test.tsv (query-id, corpus-id, graded relevance). Every query with a judged-relevant
document in the corpus is scored; documents are encoded as "title text", as BEIR does.

For each type the documents are searched exhaustively: float by cosine, int8 by the dot product
of the int8 vectors (int32 sums), binary by Hamming similarity of the packed bits. "Rescored" takes
the type's best `--candidates` (4 x 10 by default, sentence-transformers' rescore multiplier) and
orders them by the float query against the float document vectors, which a store keeps beside
the compact index (on disk). Prints nDCG@10 and recall@10 per type as JSON and as a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from handler.engine import Engine, EngineConfig
from handler.engine.compact import compact

K = 10


# JSON lines split at "\n" only: str.splitlines() would also split at U+2028 and other line
# breaks that texts carry inside their JSON strings.
def load_beir(data: Path) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    corpus: dict[str, str] = {}
    for line in (data / "corpus.jsonl").read_text(encoding="utf-8").split("\n"):
        if line.strip():
            row = json.loads(line)
            corpus[str(row["_id"])] = f"{row.get('title') or ''} {row['text']}".strip()
    queries: dict[str, str] = {}
    for line in (data / "queries.jsonl").read_text(encoding="utf-8").split("\n"):
        if line.strip():
            row = json.loads(line)
            queries[str(row["_id"])] = str(row["text"])
    qrels: dict[str, dict[str, int]] = {}
    for line in (data / "qrels" / "test.tsv").read_text(encoding="utf-8").split("\n"):
        parts = line.split("\t")
        if len(parts) < 3 or not parts[-1].strip().lstrip("-").isdigit():
            continue  # the header, or a malformed line
        qid, did, grade = parts[0], parts[1], int(parts[-1])
        if grade > 0 and did in corpus:
            qrels.setdefault(qid, {})[did] = grade
    return corpus, {q: t for q, t in queries.items() if q in qrels}, qrels


def ndcg_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int = K) -> float:
    dcg = sum(
        (2 ** judged.get(doc, 0) - 1) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k])
    )
    ideal = sorted(judged.values(), reverse=True)[:k]
    idcg = sum((2**g - 1) / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int = K) -> float:
    return len(set(ranked[:k]) & set(judged)) / len(judged)


def hamming_similarity(q: NDArray[np.uint8], d: NDArray[np.uint8]) -> NDArray[np.int64]:
    """Matching bits of every query against every document (packed uint8 rows)."""
    differing = np.unpackbits(q[:, None, :] ^ d[None, :, :], axis=-1).sum(axis=-1)
    same: NDArray[np.int64] = (q.shape[1] * 8 - differing).astype(np.int64)
    return same


def type_scores(kind: str, q: dict[str, Any], d: dict[str, Any]) -> NDArray[Any]:
    if kind == "float":
        return np.asarray(q["float"] @ d["float"].T)
    if kind == "int8":
        return np.asarray(q["int8"].astype(np.int32) @ d["int8"].astype(np.int32).T)
    return hamming_similarity(q["ubinary"], d["ubinary"])


def evaluate(
    scores: NDArray[Any],
    float_scores: NDArray[np.float32],
    doc_ids: list[str],
    query_ids: list[str],
    qrels: Mapping[str, Mapping[str, int]],
    candidates: int,
) -> dict[str, float]:
    plain_ndcg, plain_recall, re_ndcg, re_recall = [], [], [], []
    for row, qid in enumerate(query_ids):
        # Ties broken by document order, so every run ranks the same way.
        order = np.lexsort((np.arange(len(doc_ids)), -scores[row]))
        ranked = [doc_ids[i] for i in order[:K]]
        top = order[:candidates]
        rescored = top[np.argsort(-float_scores[row, top], kind="stable")]
        reranked = [doc_ids[i] for i in rescored[:K]]
        plain_ndcg.append(ndcg_at_k(ranked, qrels[qid]))
        plain_recall.append(recall_at_k(ranked, qrels[qid]))
        re_ndcg.append(ndcg_at_k(reranked, qrels[qid]))
        re_recall.append(recall_at_k(reranked, qrels[qid]))
    return {
        "ndcg@10": float(np.mean(plain_ndcg)),
        "recall@10": float(np.mean(plain_recall)),
        "rescored_ndcg@10": float(np.mean(re_ndcg)),
        "rescored_recall@10": float(np.mean(re_recall)),
    }


def measure(model: Path, data: Path, candidates: int = 4 * K) -> dict[str, Any]:
    engine = Engine.load(model, EngineConfig(warmup=False))
    ranges = engine.embedding_ranges
    if ranges is None:
        raise SystemExit(f"{model}: no embedding_ranges; run python -m model_build.ranges {model}")
    corpus, queries, qrels = load_beir(data)
    doc_ids, query_ids = list(corpus), list(queries)
    types = ["float", "int8", "ubinary"]
    d_dense = engine.encode([corpus[i] for i in doc_ids]).dense
    q_dense = engine.encode([queries[i] for i in query_ids]).dense
    assert d_dense is not None and q_dense is not None
    d, q = compact(d_dense, types, ranges), compact(q_dense, types, ranges)
    float_scores = type_scores("float", q, d)
    results: dict[str, Any] = {
        "model": engine.info.id,
        "data": data.name,
        "documents": len(doc_ids),
        "queries": len(query_ids),
        "candidates": candidates,
        "types": {},
    }
    for kind, name in (("float", "float"), ("int8", "int8"), ("ubinary", "binary")):
        figures = evaluate(
            type_scores(kind, q, d), float_scores, doc_ids, query_ids, qrels, candidates
        )
        figures["bytes_per_vector"] = int(d[kind][0].nbytes)
        results["types"][name] = figures
    return results


def table(results: Mapping[str, Any]) -> str:
    lines = [
        "| type | bytes / vector | nDCG@10 | recall@10 | nDCG@10 rescored | recall@10 rescored |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in results["types"].items():
        lines.append(
            f"| {name} | {f['bytes_per_vector']} | {f['ndcg@10']:.4f} | {f['recall@10']:.4f} | "
            f"{f['rescored_ndcg@10']:.4f} | {f['rescored_recall@10']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--candidates", type=int, default=4 * K)
    args = parser.parse_args(argv)
    results = measure(args.model, args.data, args.candidates)
    print(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
