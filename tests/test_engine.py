"""The runtime engine on artifacts built by the real build CLI.

Parity is against FlagEmbedding's BGEM3FlagModel (the reference implementation) loaded from the
same BGE-M3-layout fixture directory that the artifact was built from.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from handler.engine import Engine, EngineConfig
from handler.engine.errors import CapabilityError, InputError, InputTooLongError, ModelLoadError
from tests.conftest import REPO_ROOT

MAX_LENGTH = 48
LONG_TEXT = " ".join(f"sentence {i} talks about retrieval and vector databases." for i in range(40))
TEXTS = [
    "What is BGE M3?",
    "",
    "BGE-M3 是一個支援稠密檢索、詞彙匹配與多向量互動的嵌入模型。",
    "日本語のテキストをトークン化する。",
    "Русский текст для проверки токенизатора.",
    "한국어 문장을 토큰화합니다.",
    "مرحبا بالعالم، هذا نص عربي قصير.",
    "trailing spaces and\ttabs   ",
    LONG_TEXT,  # truncated at MAX_LENGTH
]


@pytest.fixture(scope="module")
def engine(tiny_fp32: Path) -> Engine:
    return Engine.load(tiny_fp32, EngineConfig(threads=1))


@pytest.fixture(scope="module")
def reference(bge_m3_source: Path) -> dict[str, object]:
    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(str(bge_m3_source), use_fp16=False, devices="cpu")
    out: dict[str, object] = model.encode(
        TEXTS,
        batch_size=4,
        max_length=MAX_LENGTH,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    return out


def test_parity_with_flagembedding(engine: Engine, reference: dict[str, object]) -> None:
    out = engine.encode(TEXTS, dense=True, sparse=True, colbert=True, max_length=MAX_LENGTH)
    assert out.dense is not None and out.sparse is not None and out.colbert is not None
    ref_dense = np.asarray(reference["dense_vecs"])
    np.testing.assert_allclose(out.dense, ref_dense, atol=1e-4)
    ref_sparse = reference["lexical_weights"]
    ref_colbert = reference["colbert_vecs"]
    assert isinstance(ref_sparse, list) and isinstance(ref_colbert, list)
    for i, text in enumerate(TEXTS):
        ours = {str(k): v for k, v in out.sparse[i].items()}
        theirs = {k: float(v) for k, v in ref_sparse[i].items()}
        assert ours.keys() == theirs.keys(), text
        np.testing.assert_allclose(
            [ours[k] for k in theirs], list(theirs.values()), atol=1e-4, err_msg=text
        )
        assert out.colbert[i].shape == np.asarray(ref_colbert[i]).shape, text
        np.testing.assert_allclose(out.colbert[i], ref_colbert[i], atol=1e-4, err_msg=text)
    assert out.token_counts[-1] == MAX_LENGTH  # the long text was cut at the limit
    assert out.token_counts[1] == 2  # "" is <s></s>


def test_batched_equals_single_and_keeps_input_order(engine: Engine) -> None:
    batched = engine.encode(TEXTS, dense=True, sparse=True, colbert=True, max_length=MAX_LENGTH)
    assert batched.dense is not None and batched.sparse is not None and batched.colbert is not None
    for i, text in enumerate(TEXTS):
        single = engine.encode([text], dense=True, sparse=True, colbert=True, max_length=MAX_LENGTH)
        assert single.dense is not None and single.sparse is not None and single.colbert is not None
        np.testing.assert_allclose(batched.dense[i], single.dense[0], atol=1e-5, err_msg=text)
        assert batched.sparse[i].keys() == single.sparse[0].keys()
        np.testing.assert_allclose(batched.colbert[i], single.colbert[0], atol=1e-5)
        assert batched.token_counts[i] == single.token_counts[0]


def test_small_token_budget_gives_the_same_results(tiny_fp32: Path, engine: Engine) -> None:
    small = Engine.load(tiny_fp32, EngineConfig(threads=1, batch_token_budget=64, warmup=False))
    a = engine.encode(TEXTS, max_length=MAX_LENGTH)
    b = small.encode(TEXTS, max_length=MAX_LENGTH)
    assert a.dense is not None and b.dense is not None
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)


def test_only_requested_heads_are_returned(engine: Engine) -> None:
    out = engine.encode(["hello"], dense=False, sparse=True)
    assert out.dense is None and out.colbert is None and out.sparse is not None
    with pytest.raises(InputError):
        engine.encode(["hello"], dense=False)


def test_truncate_false_refuses_long_input(engine: Engine) -> None:
    with pytest.raises(InputTooLongError) as err:
        engine.encode(["short", LONG_TEXT], max_length=MAX_LENGTH, truncate=False)
    assert err.value.index == 1 and err.value.limit == MAX_LENGTH


def test_token_id_input_is_range_checked(engine: Engine) -> None:
    ids = [0, 35378, 8999, 38, 2]
    a = engine.encode_ids([ids])
    b = engine.encode(["Hello world!"])
    assert a.dense is not None and b.dense is not None
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-6)
    with pytest.raises(InputError, match="vocabulary"):
        engine.encode_ids([[0, 250002, 2]])


def test_sparse_keys_decode_to_token_strings(engine: Engine) -> None:
    out = engine.encode(["Hello world!"], dense=False, sparse=True)
    assert out.sparse is not None
    strings = engine.token_strings(out.sparse[0])
    assert set(strings) <= {"Hello", "world", "!"}


def test_score_matches_its_components(engine: Engine) -> None:
    s = engine.score(["What is BGE M3?"], ["BGE M3 is an embedding model"], weights=(0.4, 0.2, 0.4))
    assert s.sparse is not None and s.colbert is not None and s.colbert_sparse_dense is not None
    expected = (0.4 * s.dense[0] + 0.2 * s.sparse[0] + 0.4 * s.colbert[0]) / 1.0
    assert s.colbert_sparse_dense[0] == pytest.approx(expected)
    with pytest.raises(InputError):
        engine.score(["a", "b"], ["c"])


def test_dense_only_model_refuses_sparse(minilm_fp32: Path) -> None:
    dense_only = Engine.load(minilm_fp32, EngineConfig(threads=1))
    assert dense_only.info.capabilities.sparse is False
    with pytest.raises(CapabilityError, match="sparse"):
        dense_only.encode(["hello"], sparse=True)


def test_tampered_byte_is_refused_naming_the_file(tiny_fp32: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_fp32, tmp_path / "model")
    target = next(p for p in copy.iterdir() if p.name.startswith("model.onnx"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=re.escape(target.name)):
        Engine.load(copy)


def test_missing_file_is_refused_naming_the_file(tiny_fp32: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_fp32, tmp_path / "model")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Engine.load(copy)


def test_runtime_imports_neither_torch_nor_transformers(tiny_fp32: Path) -> None:
    # A fresh interpreter that loads the engine and the whole app, then encodes.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import handler.engine, handler.app, handler.lambda_function\n"
        f"e = handler.engine.Engine.load(Path({str(tiny_fp32)!r}))\n"
        "e.encode(['hello'], sparse=True, colbert=True)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers'})\n"
        "assert not bad, bad\n"
    )
    env = {"MODEL_PATH": str(tiny_fp32), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_manifest_command_verifies_a_directory(tiny_fp32: Path, tmp_path: Path) -> None:
    from handler.engine.verify import main

    assert main([str(tiny_fp32)]) == 0
    copy = shutil.copytree(tiny_fp32, tmp_path / "model")
    (copy / "tokenizer.json").write_text("{}")
    assert main([str(copy), "--mode", "sha256"]) == 1
