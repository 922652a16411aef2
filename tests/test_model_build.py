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

from handler.engine.manifest import load_manifest, verify_files
from model_build.build import BuildOptions, build
from model_build.progress import Progress
from model_build.validate import Thresholds, lexical_weights, load_text_set
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
    raw = manifest.raw
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
    validation = raw["validation"]
    assert validation["passed"] is True
    assert validation["figures"]["dense_cosine_min"] > 0.99999
    assert validation["figures"]["sparse_top5_identical"] == 1.0
    assert validation["texts"] >= 110 and len(validation["worst_texts"]) == 5


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
        ours = lexical_weights(seq, out["sparse"][i, : len(seq)], specials)
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
    quant = raw["quantization"]
    assert quant["smoothquant"]["applied"] is True and quant["smoothquant"]["alpha"] == 0.5
    assert quant["kept_fp32"], "the quantizer must say what it kept in fp32 and why"
    assert all(entry["why"] for entry in quant["kept_fp32"])
    validation = raw["validation"]
    print("tiny int8 gate figures:", validation["figures"])
    assert validation["passed"] is True
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
    assert report.out == out and report.manifest["precision"] == "fp16"
    return out


def test_tiny_fp16(tiny_fp16: Path) -> None:
    raw = _check_artifact(tiny_fp16, recipe="bge-m3", precision="fp16")
    assert raw["quantization"]["method"] == "fp16"
    validation = raw["validation"]
    # onnxruntime 1.31's CPU provider runs the fp16 graph; where it cannot, the build records why.
    assert validation.get("passed") is True or validation.get("skipped"), validation
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
    raw = _check_artifact(minilm_int8, recipe="dense", precision="int8")
    figures = raw["validation"]["figures"]
    print(
        f"MiniLM int8 vs fp32 PyTorch: dense cosine min {figures['dense_cosine_min']:.5f}, "
        f"mean {figures['dense_cosine_mean']:.5f} over {raw['validation']['texts']} texts"
    )
    assert raw["validation"]["passed"] is True
    defaults = Thresholds()
    assert figures["dense_cosine_min"] >= defaults.min_dense_cosine
    assert figures["dense_cosine_mean"] >= defaults.min_dense_mean


# --- the gate and the CLI's errors ----------------------------------------------------------


def _small_validation_set(tmp_path: Path, count: int = 24) -> Path:
    items = load_text_set(REPO_ROOT / "model_build" / "data" / "validation.jsonl")
    path = tmp_path / "validation-small.jsonl"
    path.write_text(
        "".join(json.dumps({"lang": i.lang, "text": i.text}) + "\n" for i in items[::5][:count]),
        encoding="utf-8",
    )
    return path


def test_gate_refuses_corrupted_int8_weights(tmp_path: Path, minilm_source: Path) -> None:
    # GIVEN an existing, empty --out and an int8 build whose weight scales are deliberately wrong
    out = tmp_path / "out"
    out.mkdir()
    proc = run_model_build(
        [
            "--source", str(minilm_source),
            "--recipe", "dense",
            "--precision", "int8",
            "--no-smoothquant",
            "--validation-set", str(_small_validation_set(tmp_path)),
            "--fault-inject", "int8-weight-scale",
            "--out", str(out),
        ],
        check=False,
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
    from types import SimpleNamespace

    from model_build import build as build_module
    from model_build import validate
    from model_build.validate import EncodedSet, TextItem

    def no_kernel(path: Path) -> Any:
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find a kernel")

    monkeypatch.setattr(validate, "make_session", no_kernel)
    encoded = EncodedSet(items=[TextItem("en", "x")], ids=[[0, 5, 2]], truncated=0)
    args: dict[str, Any] = {
        "final": tmp_path / "model.onnx",
        "encoded": encoded,
        "reference": [{"dense": np.ones(4, dtype=np.float32)}],
        "model": SimpleNamespace(output_names=("dense",)),
        "tok": SimpleNamespace(special_tokens={"pad": 1}),
        "progress": Progress(quiet=True),
    }
    fp16 = BuildOptions(out=tmp_path / "out", precision="fp16")
    result = build_module._validate(options=fp16, **args)
    assert set(result) == {"skipped"} and "NOT_IMPLEMENTED" in result["skipped"]
    with pytest.raises(RuntimeError, match="NOT_IMPLEMENTED"):
        build_module._validate(options=BuildOptions(out=tmp_path / "o", precision="int8"), **args)
