"""Pure numerics of the engine: heads, scoring and batching, checked against direct computations."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from handler.engine import heads, scoring
from handler.engine.batching import pad, plan_batches


def test_sparse_weights_keep_max_per_id_and_drop_specials_and_non_positive() -> None:
    ids = np.array([0, 17, 5, 17, 9, 2, 1, 5], dtype=np.int64)
    w = np.array([0.9, 0.2, 0.0, 0.5, -0.1, 0.8, 0.7, 0.3], dtype=np.float32)
    out = heads.sparse_weights(ids, w, drop_ids={0, 1, 2, 3})
    assert out == pytest.approx({17: 0.5, 5: 0.3})
    assert all(isinstance(k, int) for k in out)


def test_sparse_weights_of_only_specials_is_empty() -> None:
    ids = np.array([0, 2], dtype=np.int64)
    assert heads.sparse_weights(ids, np.ones(2, np.float32), {0, 1, 2, 3}) == {}


def test_colbert_rows_drop_padding_but_keep_eos_row() -> None:
    colbert = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)  # (sequence - 1, dims)
    assert heads.colbert_rows(colbert, length=3).shape == (2, 2)
    assert heads.colbert_rows(colbert, length=1).shape == (0, 2)


def test_truncate_dims_renormalises() -> None:
    v = heads.l2_normalize(np.array([[3.0, 4.0, 12.0]], dtype=np.float32))
    short = heads.truncate_dims(v, 2)
    np.testing.assert_allclose(short, [[0.6, 0.8]], rtol=1e-6)


def test_scores_match_their_definitions() -> None:
    rng = np.random.default_rng(0)
    q = heads.l2_normalize(rng.normal(size=(4, 8)).astype(np.float32))
    p = heads.l2_normalize(rng.normal(size=(6, 8)).astype(np.float32))
    expected = np.mean([max(float(qi @ pj) for pj in p) for qi in q])
    assert scoring.colbert_score(q, p) == pytest.approx(expected, rel=1e-6)
    assert scoring.lexical_score({1: 0.5, 2: 0.25}, {2: 2.0, 3: 9.0}) == pytest.approx(0.5)
    assert scoring.dense_score(q[0], q[0]) == pytest.approx(1.0, rel=1e-6)
    sd, all3 = scoring.hybrid_scores(0.6, 0.2, 0.8, (0.4, 0.2, 0.4))
    assert sd == pytest.approx((0.2 * 0.2 + 0.4 * 0.6) / 0.6)
    assert all3 == pytest.approx(0.4 * 0.6 + 0.2 * 0.2 + 0.4 * 0.8)


def test_batches_respect_budget_cover_every_input_once_and_sort_by_length() -> None:
    lengths = [5, 300, 7, 7, 1000, 2, 64, 64, 64]
    batches = plan_batches(lengths, token_budget=512, max_batch=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 4
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 512
    assert batches[0] == [4]  # longer than the budget: alone, and first
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_square_budget_bounds_padded_attention_and_long_inputs_run_alone() -> None:
    # 8192 + 8000 tokens fit 16384 padded tokens, but their 2 x 8192^2 scores would not.
    lengths = [8000, 8192, 100, 90, 80]
    batches = plan_batches(lengths, token_budget=16384, max_batch=64, square_budget=1 << 22)
    assert batches[:2] == [[1], [0]]
    assert batches[2:] == [[2, 3, 4]]
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) ** 2 * len(b) <= 1 << 22
    with pytest.raises(ValueError):
        plan_batches(lengths, token_budget=16384, max_batch=64, square_budget=0)


def test_pad_right_pads_with_mask() -> None:
    ids, mask = pad([[0, 5, 2], [0, 2]], pad_id=1)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.tolist() == [[0, 5, 2], [0, 2, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_vnni_detection_reads_cpu_flags() -> None:
    from handler.engine.session import x86_without_vnni

    if platform.machine().lower() not in {"x86_64", "amd64"}:
        # Only x86 has the saturating kernel: elsewhere the answer is always "no problem".
        assert x86_without_vnni("flags\t: fpu\n") is False
        return
    assert x86_without_vnni("flags\t: fpu sse2 avx2 avx512f\n") is True
    assert x86_without_vnni("flags\t: fpu avx2 avx512f avx512_vnni\n") is False
    assert x86_without_vnni("flags\t: fpu avx2 avx_vnni\n") is False


def test_dense_cosine_stays_within_unit_for_fp16_vectors() -> None:
    # GIVEN unit vectors as an fp16 graph gives them: rounded to fp16, norms off 1 by ~1e-3
    rng = np.random.default_rng(7)
    v = heads.l2_normalize(rng.standard_normal(1024).astype(np.float32))
    q = (v * np.float32(1.0002)).astype(np.float16).astype(np.float32)
    assert float(np.dot(q, q)) > 1.0003  # the plain dot product reads above 1
    # THEN the cosine is 1 at most, and -1 at least, yet still the cosine of the two vectors
    assert scoring.dense_score(q, q) <= 1.0
    assert scoring.dense_score(q, -q) >= -1.0
    assert scoring.dense_score(q, q) == pytest.approx(1.0, abs=1e-12)
    p = heads.l2_normalize(rng.standard_normal(1024).astype(np.float32))
    cosine = float(np.dot(q, p) / (np.linalg.norm(q) * np.linalg.norm(p)))
    assert scoring.dense_score(q, p) == pytest.approx(cosine, abs=1e-6)
    rows = np.stack([q, q])
    assert scoring.colbert_score(rows, rows) <= 1.0


def test_dimensions_are_checked_and_leave_the_full_width_untouched() -> None:
    from handler.engine.errors import InputError
    from handler.engine.types import Encoded

    dense = heads.l2_normalize(np.array([[3.0, 4.0, 12.0]], dtype=np.float32))
    encoded = Encoded(dense=dense, sparse=None, colbert=None, token_counts=[3])
    assert heads.shortened(encoded, None) is encoded
    assert heads.shortened(encoded, 3) is encoded
    np.testing.assert_allclose(heads.shortened(encoded, 2).dense, [[0.6, 0.8]], rtol=1e-6)
    heads.check_dimensions(3, 3, "m")
    with pytest.raises(InputError, match="'dimensions' is 4, but model 'm' has 3") as info:
        heads.check_dimensions(4, 3, "m")
    assert info.value.code == "invalid_dimensions" and info.value.param == "dimensions"


def test_total_tokens_are_counted_after_truncation_and_before_too_long() -> None:
    from handler.engine.errors import InputTooLongError, TooManyTokensError
    from handler.engine.tokenizer import fit

    def cut(ids: list[int], n: int) -> list[int]:
        return ids[:n]

    seqs = [list(range(10)), list(range(3))]
    assert [len(s) for s in fit(seqs, cut, max_length=4, truncate=True, max_tokens=7)] == [4, 3]
    with pytest.raises(TooManyTokensError) as info:
        fit(seqs, cut, max_length=4, truncate=True, max_tokens=6)
    assert (info.value.total, info.value.limit) == (7, 6)
    # Over both limits: the total, which truncation cannot lift, is what the caller hears first.
    with pytest.raises(TooManyTokensError):
        fit(seqs, cut, max_length=4, truncate=False, max_tokens=6)
    with pytest.raises(InputTooLongError):
        fit(seqs, cut, max_length=4, truncate=False, max_tokens=None)
