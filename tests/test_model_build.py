"""`python -m model_build` end to end: artifacts of the tiny BGE-M3-layout fixture and of the real
all-MiniLM-L6-v2, checked against the manifest schema, against FlagEmbedding and
sentence-transformers themselves, and the fidelity gate refusing a broken int8 model.

The builds are session fixtures (tests/conftest.py) that run the CLI as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from handler.engine.heads import sparse_weights
from handler.engine.manifest import Thresholds, load_manifest, verify_files
from model_build.build import BuildOptions, build
from model_build.progress import Progress
from model_build.validate import load_text_set
from tests.conftest import DATA_DIR, REPO_ROOT, run_model_build

PARITY_TEXTS = [
    "Hello",
    "What is BGE M3?",
    "BM25 is a bag-of-words retrieval function that ranks documents by query term frequency.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "Москва — столица России.  Trailing spaces and  doubled  spaces   ",
    " ".join(["Long inputs exercise the position table and the padding of a mixed batch."] * 40),
]


def _ort_session(model_dir: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])


def _tokenizer(model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def _run(model_dir: Path, texts: list[str]) -> tuple[dict[str, NDArray[Any]], list[list[int]]]:
    """One padded batch through the artifact, the way the engine runs it."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    ids = [e.ids for e in _tokenizer(model_dir).encode_batch(texts)]
    width = max(len(i) for i in ids)
    input_ids = np.full((len(ids), width), manifest["special_tokens"]["pad"], dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    session = _ort_session(model_dir)
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, {"input_ids": input_ids, "attention_mask": mask})
    return dict(zip(names, outputs, strict=True)), ids


def _check_artifact(model_dir: Path, *, recipe: str, precision: str) -> dict[str, Any]:
    manifest = load_manifest(model_dir)  # the runtime's own parser
    verify_files(model_dir, manifest, "sha256")
    raw: dict[str, Any] = json.loads((model_dir / "manifest.json").read_text())
    assert raw["recipe"] == recipe and raw["precision"] == precision
    files = {"model.onnx", "model.onnx_data", "tokenizer.json"}
    if recipe == "bge-m3":  # the XLM-R Unigram vocabulary also goes to sentencepiece
        files |= {"sentencepiece.model", "tokenizer.frontend.json"}
    assert set(raw["files"]) == files
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([*raw["files"], "manifest.json"])
    for path in model_dir.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o444 == 0o444, f"{path.name} is not world-readable ({oct(mode)})"
    assert raw["onnx"]["file"] == "model.onnx"
    assert raw["onnx"]["external_data"] == "model.onnx_data"
    # CPU precisions ship the graph onnxruntime optimized at build time (its files are the ones
    # under sha256 above, and nothing else was left behind); fp16, the GPU variant, does not.
    if precision == "fp16":
        assert raw["onnx"]["optimized"] is None
    else:
        import onnxruntime as ort

        assert raw["onnx"]["optimized"] == {
            "level": "extended",
            "onnxruntime": ort.__version__,
            "provider": "CPUExecutionProvider",
            "disabled_optimizers": ["SkipLayerNormFusion"],
        }
    assert raw["onnx"]["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
    ]
    assert isinstance(raw["created"], int)
    assert set(raw["tools"]) == {
        "torch", "transformers", "onnx", "onnxruntime", "tokenizers", "huggingface_hub"
    }  # fmt: skip
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    assert tokenizer["truncation"] is None and tokenizer["padding"] is None
    # The graph's declared I/O matches the manifest.
    session = _ort_session(model_dir)
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)"),
        ("attention_mask", "tensor(int64)"),
    ]
    declared = [(o.name, o.type, o.shape) for o in session.get_outputs()]
    assert declared == [(o["name"], "tensor(float)", o["shape"]) for o in raw["onnx"]["outputs"]]
    # Weights live in the external file (the graph file is small).
    assert (model_dir / "model.onnx").stat().st_size < (
        model_dir / "model.onnx_data"
    ).stat().st_size
    return raw


# --- the tiny BGE-M3-layout fixture ---------------------------------------------------------


def test_tiny_fp32_manifest(tiny_fp32: Path) -> None:
    raw = _check_artifact(tiny_fp32, recipe="bge-m3", precision="fp32")
    assert raw["model_id"] == "bge-m3"
    assert raw["aliases"] == ["BAAI/bge-m3"]
    assert raw["dims"] == 32 and raw["colbert_dims"] == 32
    assert raw["max_length"] == 8192
    assert raw["vocab_size"] == 250002
    assert raw["pooling"] == "cls" and raw["normalize"] is True
    assert raw["special_tokens"] == {"cls": 0, "sep": 2, "pad": 1, "unk": 3}
    assert raw["onnx"]["opset"] == 17
    assert [o["name"] for o in raw["onnx"]["outputs"]] == ["dense", "sparse", "colbert"]
    assert raw["onnx"]["outputs"][2]["shape"] == ["batch", "sequence-1", 32]
    assert raw["tokenizer"]["pre_tokenizer"].startswith("Sequence([WhitespaceSplit(), Metaspace(")
    assert raw["source"]["local_dir"] and raw["source"]["repo"] is None
    assert raw["source"]["weights"] == "pytorch_model.bin"
    assert raw["quantization"]["method"] == "none"
    validation = load_manifest(tiny_fp32).validation
    assert validation is not None and validation.passed is True
    assert validation.figures is not None and validation.figures.sparse is not None
    assert validation.figures.dense.cosine_min > 0.99999
    assert validation.figures.sparse.lexical_error < 1e-4
    assert validation.figures.sparse.top_overlap_min > 0.9999
    assert validation.texts >= 110 and validation.queries == validation.texts
    assert len(validation.worst_texts) == 5


def test_tiny_fp32_outputs(tiny_fp32: Path) -> None:
    out, ids = _run(tiny_fp32, ["short", "a somewhat longer text than the first one"])
    width = max(len(i) for i in ids)
    assert out["dense"].shape == (2, 32) and out["dense"].dtype == np.float32
    assert out["sparse"].shape == (2, width)
    assert out["colbert"].shape == (2, width - 1, 32)
    np.testing.assert_allclose(np.linalg.norm(out["dense"], axis=1), 1.0, atol=1e-5)
    assert (out["sparse"] >= 0).all()
    real = len(ids[0]) - 1  # ColBERT rows of the short text: its tokens after <s>
    np.testing.assert_allclose(np.linalg.norm(out["colbert"][0, :real], axis=1), 1.0, atol=1e-5)
    assert not out["colbert"][0, real:].any(), "padded ColBERT rows must be zero"


def test_attention_runs_as_multihead_attention_with_an_unpadded_branch(tiny_fp32: Path) -> None:
    """Every layer's eager attention became an If over two MultiHeadAttention nodes: without a
    padding mask (onnxruntime's tiled kernel, which never holds S x S scores) when the batch has
    no padding, with one otherwise. Both branches give the same numbers for the same text."""
    import onnx

    graph = onnx.load(str(tiny_fp32 / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "Softmax" not in ops
    ifs = [n for n in graph.node if n.op_type == "If"]
    assert len(ifs) == 2  # the fixture's two layers
    for node in ifs:
        branches = {a.name: [n.op_type for n in a.g.node] for a in node.attribute}
        assert branches == {
            "then_branch": ["MultiHeadAttention"],
            "else_branch": ["MultiHeadAttention"],
        }
        mha = {a.name: a.g.node[0] for a in node.attribute}
        then_mha, else_mha = mha["then_branch"], mha["else_branch"]
        assert len([i for i in then_mha.input if i]) == 3  # q, k, v: no mask
        assert else_mha.input[4]  # key_padding_mask
    raw = json.loads((tiny_fp32 / "manifest.json").read_text())
    assert raw["onnx"]["attention"]["layers"] == 2

    text = "a text that runs once alone and once beside a longer one"
    alone, _ = _run(tiny_fp32, [text])
    padded, ids = _run(tiny_fp32, [text, text + " and then some more words to pad it"])
    assert len(ids[1]) > len(ids[0])
    np.testing.assert_allclose(alone["dense"][0], padded["dense"][0], atol=1e-6)
    np.testing.assert_allclose(alone["sparse"][0], padded["sparse"][0, : len(ids[0])], atol=1e-6)


def test_tiny_fp32_parity_with_flagembedding(tiny_fp32: Path, bge_m3_source: Path) -> None:
    """The graph reproduces FlagEmbedding's BGEM3FlagModel on the same weights (fp32, 1e-5)."""
    from FlagEmbedding import BGEM3FlagModel

    reference = BGEM3FlagModel(str(bge_m3_source), use_fp16=False, devices="cpu")
    ref = reference.encode(
        PARITY_TEXTS,
        batch_size=4,
        max_length=8192,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    out, ids = _run(tiny_fp32, PARITY_TEXTS)
    specials = {0, 1, 2, 3}
    for i, seq in enumerate(ids):
        np.testing.assert_allclose(out["dense"][i], ref["dense_vecs"][i], atol=1e-5)
        ours = sparse_weights(np.array(seq), out["sparse"][i, : len(seq)], specials)
        theirs = {int(k): float(v) for k, v in ref["lexical_weights"][i].items() if v > 0}
        assert ours.keys() == theirs.keys()
        for token, weight in theirs.items():
            assert ours[token] == pytest.approx(weight, abs=1e-5)
        rows = out["colbert"][i, : len(seq) - 1]
        np.testing.assert_allclose(rows, ref["colbert_vecs"][i], atol=1e-5)


def test_tokenizer_matches_reference_cases(tiny_fp32: Path) -> None:
    """The written tokenizer gives the real BGE-M3 ids (transformers 5.x) for all 109 cases."""
    cases = json.loads((DATA_DIR / "tokenizer_cases.json").read_text(encoding="utf-8"))
    tokenizer = _tokenizer(tiny_fp32)
    wrong = [c["text"] for c in cases if tokenizer.encode(c["text"]).ids != c["ids"]]
    assert len(cases) == 109 and not wrong, wrong[:5]


def test_tiny_int8(tiny_int8: Path) -> None:
    raw = _check_artifact(tiny_int8, recipe="bge-m3", precision="int8")
    quant = raw["quantization"]["report"]
    assert raw["quantization"]["int8_weights"] == "s8"
    assert quant["smoothquant"]["applied"] is True and quant["smoothquant"]["alpha"] == 0.5
    assert quant["kept_fp32"], "the quantizer must say what it kept in fp32 and why"
    assert all(entry["why"] for entry in quant["kept_fp32"])
    validation = load_manifest(tiny_int8).validation
    assert validation is not None
    print("tiny int8 gate figures:", validation.figures)
    assert validation.passed is True
    out, _ = _run(tiny_int8, ["int8 smoke test"])
    assert out["dense"].dtype == np.float32 and out["colbert"].shape[2] == 32


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory: pytest.TempPathFactory, bge_m3_source: Path) -> Path:
    """Built through the Python API (the CLI is a thin wrapper around it)."""
    out = tmp_path_factory.mktemp("api") / "tiny-fp16"
    report = build(
        BuildOptions(out=out, source=str(bge_m3_source), precision="fp16"),
        Progress(quiet=True),
    )
    assert report.out == out and report.manifest.precision == "fp16"
    return out


def test_tiny_fp16(tiny_fp16: Path) -> None:
    raw = _check_artifact(tiny_fp16, recipe="bge-m3", precision="fp16")
    assert raw["quantization"]["method"] == "fp16"
    validation = load_manifest(tiny_fp16).validation
    # onnxruntime 1.31's CPU provider runs the fp16 graph; where it cannot, the build records why.
    assert validation is not None and (validation.passed or validation.skipped), validation
    out, _ = _run(tiny_fp16, ["fp16 keeps float32 inputs and outputs"])
    assert out["dense"].dtype == np.float32


# --- all-MiniLM-L6-v2 (real weights, dense recipe) ------------------------------------------


def test_minilm_fp32_matches_sentence_transformers(minilm_fp32: Path, minilm_source: Path) -> None:
    from sentence_transformers import SentenceTransformer

    raw = _check_artifact(minilm_fp32, recipe="dense", precision="fp32")
    assert raw["model_id"] == minilm_source.name.lower()
    assert raw["pooling"] == "mean" and raw["normalize"] is True
    assert raw["dims"] == 384 and raw["max_length"] == 256
    assert raw["special_tokens"] == {"cls": 101, "sep": 102, "pad": 0, "unk": 100}
    assert raw["tokenizer"]["pre_tokenizer"] == "unchanged: BertPreTokenizer()"
    assert [o["name"] for o in raw["onnx"]["outputs"]] == ["dense"]
    texts = [t for t in PARITY_TEXTS if len(t) < 1000]  # below max_seq_length (no truncation)
    model = SentenceTransformer(str(minilm_source), device="cpu")
    expected = model.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
    out, _ = _run(minilm_fp32, texts)
    cosines = (out["dense"] * expected).sum(axis=1) / (
        np.linalg.norm(out["dense"], axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosines.min() >= 0.99999, cosines


def test_minilm_int8_gate(minilm_int8: Path) -> None:
    _check_artifact(minilm_int8, recipe="dense", precision="int8")
    validation = load_manifest(minilm_int8).validation
    assert validation is not None and validation.figures is not None
    dense = validation.figures.dense
    print(
        f"MiniLM int8 vs fp32 PyTorch: dense cosine min {dense.cosine_min:.5f}, "
        f"mean {dense.cosine_mean:.5f} over {validation.texts} texts"
    )
    assert validation.passed is True
    assert validation.figures.sparse is None and validation.queries == 0  # no sparse head
    defaults = Thresholds()
    assert dense.cosine_min >= defaults.min_dense_cosine
    assert dense.cosine_mean >= defaults.min_dense_mean


# --- the gate and the CLI's errors ----------------------------------------------------------


def _small_validation_set(tmp_path: Path, count: int = 24) -> Path:
    items = load_text_set(REPO_ROOT / "model_build" / "data" / "validation.jsonl")
    path = tmp_path / "validation-small.jsonl"
    path.write_text(
        "".join(json.dumps({"lang": i.lang, "text": i.text}) + "\n" for i in items[::5][:count]),
        encoding="utf-8",
    )
    return path


def _faulty_build(
    tmp_path: Path, source: Path, fault: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """A build into tmp_path/out with a deliberate fault, on a fifth of the validation set."""
    validation = _small_validation_set(tmp_path)
    return run_model_build(
        [
            "--source", str(source), *args,
            "--validation-set", str(validation),
            "--fault-inject", fault,
            "--out", str(tmp_path / "out"),
        ],
        check=False,
    )  # fmt: skip


def test_gate_refuses_corrupted_int8_weights(tmp_path: Path, minilm_source: Path) -> None:
    # GIVEN an existing, empty --out and an int8 build whose weight scales are deliberately wrong
    out = tmp_path / "out"
    out.mkdir()
    proc = _faulty_build(
        tmp_path, minilm_source, "int8-weight-scale",
        "--recipe", "dense", "--precision", "int8", "--no-smoothquant",
    )  # fmt: skip
    # THEN the gate refuses (exit 1), says why, and nothing reaches --out
    assert proc.returncode == 1, proc.stderr
    assert "fidelity gate failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "validation-small.jsonl"]


def test_missing_file_in_local_dir_is_named(tmp_path: Path, bge_m3_source: Path) -> None:
    source = tmp_path / "incomplete"
    shutil.copytree(bge_m3_source, source, ignore=shutil.ignore_patterns("sparse_linear.pt"))
    proc = run_model_build(
        ["--source", str(source), "--precision", "fp32", "--out", str(tmp_path / "out")],
        check=False,
    )
    assert proc.returncode == 2
    assert "missing sparse_linear.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_non_empty_out_needs_force(tmp_path: Path, bge_m3_source: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_model_build(["--source", str(bge_m3_source), "--out", str(out)], check=False)
    assert proc.returncode == 2
    assert "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in (
        ["--out", str(tmp_path / "o"), "--precision", "int4"],
        ["--out", str(tmp_path / "o"), "--min-dense-cosine", "1.5"],
        ["--precision", "fp32"],  # no --out
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "model_build", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert "usage:" in proc.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "model_build", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "--fault-inject" not in help_text  # a test hook, not a product flag
    assert "--calibration-set" in help_text and "--smoothquant-alpha" in help_text


def test_fp16_that_cpu_cannot_run_is_built_but_marked_skipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where onnxruntime's CPU provider has no fp16 kernel, the figures are not invented: the
    manifest says why validation was skipped. Any other precision that cannot run is an error."""
    from handler.engine.errors import ModelLoadError
    from handler.engine.types import Encoded
    from model_build import gate, validate
    from model_build.validate import EncodedSet, TextItem

    def no_kernel(path: Path) -> Any:
        cause = RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find a kernel")
        raise ModelLoadError(f"{path}: cannot be loaded ({cause})") from cause

    monkeypatch.setattr(validate, "load_served", no_kernel)
    probe = EncodedSet(items=[TextItem("en", "x")], ids=[[0, 5, 2]], truncated=0)
    args: dict[str, Any] = {
        "staging": tmp_path,
        "probe": probe,
        "n_texts": 1,
        "reference": Encoded(
            dense=np.ones((1, 4), dtype=np.float32), sparse=None, colbert=None, token_counts=[3]
        ),
        "real": gate.RealModelInputs(skipped="no sparse head"),
        "thresholds": Thresholds(),
        "set_name": "validation.jsonl",
        "progress": Progress(quiet=True),
    }
    result = gate.run(precision="fp16", **args)
    assert result.passed is False and result.figures is None
    assert result.skipped is not None and "NOT_IMPLEMENTED" in result.skipped
    with pytest.raises(ModelLoadError, match="NOT_IMPLEMENTED"):
        gate.run(precision="int8", **args)


# --- the gate runs the served path -------------------------------------------------------------


def test_the_gated_bytes_are_the_served_bytes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bge_m3_source: Path
) -> None:
    """The gate loads the staging directory with the runtime engine (the server's loader, session
    options and batching); the files it loaded are, byte for byte, the ones in --out."""
    from handler.engine.engine import Engine
    from handler.engine.manifest import sha256_file
    from model_build import validate

    seen: dict[str, Any] = {}
    load_served = validate.load_served

    def spy(model_dir: Path) -> Engine:
        engine = load_served(model_dir)
        seen["dir"] = model_dir
        seen["digests"] = {
            p.name: sha256_file(p) for p in model_dir.iterdir() if p.name != "manifest.json"
        }
        seen["options"] = engine.session.get_session_options()
        return engine

    monkeypatch.setattr(validate, "load_served", spy)
    out = tmp_path / "tiny-int8"
    report = build(
        BuildOptions(
            out=out,
            source=str(bge_m3_source),
            precision="int8",
            validation_set=_small_validation_set(tmp_path),
        ),
        Progress(quiet=True),
    )
    # THEN the engine loaded the staging directory, never --out itself
    assert seen["dir"].parent == out.parent and seen["dir"] != out
    validation = report.validation
    served = {p.name: sha256_file(p) for p in out.iterdir() if p.name != "manifest.json"}
    assert seen["digests"] == served == validation.gated_files
    assert {n: e.sha256 for n, e in load_manifest(out).files.items()} == served
    # AND the server's engine runs the model with the same session options and budgets
    engine = Engine.load(out)
    options = engine.session.get_session_options()
    for name in ("intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level"):
        assert getattr(options, name) == getattr(seen["options"], name), name
    assert validation.session is not None
    assert validation.session.loader == "handler.engine.engine.Engine.load"
    assert validation.session.threads == engine.threads
    assert validation.session.batch_token_budget == engine.config.batch_token_budget
    assert validation.real_model is not None and validation.real_model.skipped


def test_gate_refuses_a_damaged_sparse_head(tmp_path: Path, bge_m3_source: Path) -> None:
    # GIVEN a build whose sparse head is off (noise on its weights) while dense and ColBERT are not
    out = tmp_path / "out"
    proc = _faulty_build(tmp_path, bge_m3_source, "sparse-head", "--precision", "fp32")
    # THEN the gate refuses it on the sparse measures alone
    assert proc.returncode == 1, proc.stderr
    failure = proc.stderr.split("fidelity gate failed for fp32:")[1].splitlines()[0]
    assert "lexical_error" in failure and "sparse_top_overlap_mean" in failure
    assert "dense" not in failure and "colbert" not in failure
    assert "real-model check skipped" in proc.stderr
    assert not out.exists()


def _flagembedding_weights(source: Path, texts: list[str]) -> list[dict[int, float]]:
    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(str(source), use_fp16=False, devices="cpu")
    out = model.encode(texts, batch_size=4, max_length=8192, return_sparse=True)
    return [{int(t): float(w) for t, w in row.items() if w > 0} for row in out["lexical_weights"]]


def test_real_model_comparison_with_computed_weights(
    tmp_path: Path, bge_m3_source: Path, tiny_fp32: Path, tiny_int8: Path
) -> None:
    """The comparison against a recorded reference, with a reference whose weights are known:
    FlagEmbedding's on the tiny fixture's weights, for the 11 recorded texts."""
    from handler.engine.engine import Engine
    from model_build import real_reference

    texts = real_reference.load_recorded().sentences
    path = tmp_path / "embeddings_ref.json"
    expected = _flagembedding_weights(bge_m3_source, texts)
    rows = [{str(t): w for t, w in row.items()} for row in expected]
    document = {"sentences": texts, "lexical_weights": rows}
    path.write_text(json.dumps(document))
    recorded = real_reference.load_recorded(path)
    assert recorded.weights == expected

    def weights(model_dir: Path) -> list[dict[int, float]]:
        encoded = Engine.load(model_dir).encode(texts, dense=False, sparse=True)
        assert encoded.sparse is not None
        return encoded.sparse

    fp32, int8 = weights(tiny_fp32), weights(tiny_int8)
    limits = Thresholds()
    # THEN our fp32 and int8 builds agree with them
    check = real_reference.check(recorded.weights, fp32, int8, limits)
    assert check.passed, check.failures
    assert check.fp32 is not None and check.fp32.max_weight_error < 1e-4
    assert check.built is not None and check.built.lexical_error < limits.max_lexical_error
    # AND a reference off by 0.01 in one weight refuses the fp32 side
    off = [dict(row) for row in recorded.weights]
    token = next(iter(off[1]))
    off[1][token] += 0.01
    refused = real_reference.check(off, fp32, int8, limits)
    assert not refused.passed and "fp32 reference" in refused.failures[0]
    # AND a built model whose weights are all 8% high is refused on the lexical scores
    high = [{t: w * 1.08 for t, w in row.items()} for row in int8]
    refused = real_reference.check(recorded.weights, fp32, high, limits)
    assert [f.split(" built ")[1].split()[0] for f in refused.failures] == ["lexical_error"]
