"""The runtime's two tokenizer backends on artifacts built by the real build.

The reference is the real BGE-M3 tokenizer's ids (tests/data/tokenizer_cases.json, transformers
5.x) and, beyond those cases, the artifact's tokenizer.json run by the `tokenizers` library.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, processors

from handler.engine.manifest import load_manifest
from handler.engine.tokenizer import HuggingFaceBackend, SentencePieceBackend, TextTokenizer
from model_build import sentencepiece_export
from model_build.tokenizer import prepare_tokenizer
from tests.conftest import DATA_DIR

CASES = json.loads((DATA_DIR / "tokenizer_cases.json").read_text(encoding="utf-8"))


def _backends(artifact: Path) -> tuple[HuggingFaceBackend, SentencePieceBackend]:
    manifest = load_manifest(artifact)
    spm = manifest.sentencepiece
    assert spm is not None, manifest.tokenizer.sentencepiece
    return (
        HuggingFaceBackend(artifact / manifest.tokenizer_file),
        SentencePieceBackend(artifact / spm.model_file, artifact / spm.frontend_file, cls=0, sep=2),
    )


def _texts_other_than_the_builds(count: int) -> list[str]:
    """Not the build's probes: another seed, longer strings, words mixed with specials."""
    rng = random.Random(20261121)
    pieces = ["<s>", "</s>", "<mask>", " ", "\t", "\n", "  ", "ﾊﾟ", "é", "👍🏽", "中文", "mañana"]
    out = []
    for _ in range(300):
        text = "".join(
            rng.choice(pieces) if rng.random() < 0.3 else chr(rng.randint(0x20, 0x2FFF))
            for _ in range(rng.randint(1, 80))
        )
        out.append(text)
    return out


def test_the_bge_m3_artifact_serves_with_sentencepiece(tiny_fp32: Path) -> None:
    # GIVEN an artifact built from the real XLM-R tokenizer.json
    manifest = load_manifest(tiny_fp32)
    # THEN the build proved the sentencepiece files and the runtime loads them
    section = manifest.tokenizer.sentencepiece
    assert section is not None and section.used is True and section.probe_texts > 1000
    assert TextTokenizer.load(tiny_fp32, manifest).backend.name == "sentencepiece"


@pytest.mark.parametrize("backend_index", [0, 1], ids=["tokenizers", "sentencepiece"])
def test_both_backends_give_the_real_bge_m3_ids(tiny_fp32: Path, backend_index: int) -> None:
    backend = _backends(tiny_fp32)[backend_index]
    tok = TextTokenizer(backend, vocab_size=250002)
    ids = tok.encode([c["text"] for c in CASES], max_length=1_000_000, truncate=True)
    wrong = [c["text"][:40] for c, got in zip(CASES, ids, strict=True) if got != c["ids"]]
    assert len(CASES) == 109 and not wrong, wrong[:5]


def test_sentencepiece_agrees_with_tokenizer_json_beyond_the_cases(tiny_fp32: Path) -> None:
    hf, spm = _backends(tiny_fp32)
    texts = _texts_other_than_the_builds(300)
    texts.append(" ".join(texts))  # one long text, several thousand tokens
    assert spm.encode_batch(texts) == hf.encode_batch(texts)


def test_sparse_keys_are_the_same_with_either_backend(tiny_fp32: Path) -> None:
    hf, spm = _backends(tiny_fp32)
    ids = sorted({i for c in CASES for i in c["ids"]} | {6, 250001})
    weights = {i: float(n) for n, i in enumerate(ids)}
    a = TextTokenizer(hf, vocab_size=250002).token_strings(weights)
    b = TextTokenizer(spm, vocab_size=250002).token_strings(weights)
    assert a == b and "▁" in a  # the bare word-boundary piece keeps its own name


def test_truncation_keeps_the_closing_token(tiny_fp32: Path) -> None:
    tok = TextTokenizer.load(tiny_fp32, load_manifest(tiny_fp32))
    [ids] = tok.encode(["one two three four five six seven"], max_length=5, truncate=True)
    assert len(ids) == 5 and ids[0] == 0 and ids[-1] == 2


def _prepared(tmp_path: Path, tiny_fp32: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(tiny_fp32 / "tokenizer.json", source / "tokenizer.json")
    return source


def test_export_is_refused_when_the_ids_would_differ(tmp_path: Path, tiny_fp32: Path) -> None:
    # GIVEN a Unigram tokenizer whose template wraps texts in two <s> (sentencepiece writes one)
    prepared = prepare_tokenizer(_prepared(tmp_path, tiny_fp32))
    prepared.tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> <s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    out = tmp_path / "out"
    out.mkdir()
    # WHEN the build exports it
    report = sentencepiece_export.export(prepared, out, ["hello world"])
    # THEN nothing is written and the manifest section says why
    assert report.used is False and report.reason and "tokenize differently" in report.reason
    assert sorted(p.name for p in out.iterdir()) == []


def test_wordpiece_models_keep_tokenizer_json(minilm_fp32: Path) -> None:
    manifest = load_manifest(minilm_fp32)
    assert manifest.sentencepiece is None
    section = manifest.tokenizer.sentencepiece
    assert section is not None and section.reason is not None and "not Unigram" in section.reason
    assert TextTokenizer.load(minilm_fp32, manifest).backend.name == "tokenizers"
    assert not (minilm_fp32 / sentencepiece_export.MODEL_FILE).exists()


def test_the_frontend_file_has_no_vocabulary(tiny_fp32: Path) -> None:
    front = Tokenizer.from_file(str(tiny_fp32 / sentencepiece_export.FRONTEND_FILE))
    # The special tokens keep their ids; nothing else is in it.
    assert front.get_vocab_size(with_added_tokens=True) == 5
    assert front.token_to_id("<mask>") == 250001
