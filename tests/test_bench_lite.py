"""The bge-m3-lite baseline's preparation (bench/lite.py), on the tiny fixture's real XLM-R
tokenizer: bge-m3-lite itself runs only on the full-size model (`make bench`), so these are the
parts that can rot without it: its tokenizer file and the digests it accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.lite import (
    HEAD_FILES,
    SPM_FILE,
    accept_files,
    file_digest,
    probe_texts,
    sentencepiece_model,
    tokenizer_mismatches,
)

hub = pytest.importorskip("bge_m3_lite.hub")


def test_sentencepiece_file_gives_the_ids_of_tokenizer_json(
    bge_m3_source: Path, tmp_path: Path
) -> None:
    tokenizer_file = bge_m3_source / "tokenizer.json"
    spm = tmp_path / SPM_FILE
    spm.write_bytes(sentencepiece_model(json.loads(tokenizer_file.read_text(encoding="utf-8"))))
    texts = probe_texts()
    assert len(texts) > 200
    assert tokenizer_mismatches(spm, tokenizer_file, texts) == []


def test_a_tokenizer_that_is_not_xlm_r_is_refused(minilm_source: Path) -> None:
    doc = json.loads((minilm_source / "tokenizer.json").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="XLM-R"):
        sentencepiece_model(doc)


def test_bge_m3_lite_accepts_our_files_and_still_checks_them(
    bge_m3_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def put_files() -> None:  # ensure_files deletes a file it refuses
        (tmp_path / SPM_FILE).write_bytes(b"stands in for the tokenizer file")
        for name in HEAD_FILES:
            (tmp_path / name).write_bytes((bge_m3_source / name).read_bytes())

    put_files()
    accepted = {name: file_digest(tmp_path / name) for name in (SPM_FILE, *HEAD_FILES)}
    monkeypatch.setenv("BGE_M3_LITE_OFFLINE", "1")
    for name in ("TOKENIZER_FILES", "HEAD_FILES"):  # restored after the test
        monkeypatch.setattr(hub, name, getattr(hub, name))
    with pytest.raises(FileNotFoundError):  # the real files' digests: ours are refused
        hub.ensure_files(hub.TOKENIZER_FILES + hub.HEAD_FILES, tmp_path, quiet=True)

    put_files()
    accept_files(hub, accepted)
    found = hub.ensure_files(hub.TOKENIZER_FILES + hub.HEAD_FILES, tmp_path, quiet=True)
    assert set(found) == {SPM_FILE, *HEAD_FILES}

    (tmp_path / SPM_FILE).write_bytes(b"stands in for the tokenizer filX")  # same size
    with pytest.raises(FileNotFoundError):  # still digest-checked: a changed file is refused
        hub.ensure_files(hub.TOKENIZER_FILES, tmp_path, quiet=True)
