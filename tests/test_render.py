"""The response writer (handler/api/render.py): the bytes every embedding response is made of."""

from __future__ import annotations

import json

import numpy as np
import pytest

from handler.api.render import to_json
from handler.errors import ApiError


def test_float32_vectors_read_back_exactly_in_fewer_digits_than_float64() -> None:
    rng = np.random.default_rng(7)
    vector = rng.standard_normal(1024).astype(np.float32)
    vector /= np.linalg.norm(vector)
    text = to_json({"embedding": vector})
    back = np.asarray(json.loads(text)["embedding"], dtype=np.float32)
    assert np.array_equal(back, vector)
    # The shortest text that reads back as the same float32: at most 9 significant digits,
    # where float64's repr of the same values takes up to 17.
    numbers = text.decode().split("[", 1)[1].split("]", 1)[0].split(",")
    digits = [n.lstrip("-").split("e")[0].replace(".", "").lstrip("0") for n in numbers]
    assert max(len(d) for d in digits) <= 9


def test_slices_half_floats_scalars_and_id_keys_are_written_as_numbers() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    doc = {
        "columns": matrix[:, :2],  # not C-contiguous
        "half": np.array([0.5, 1.5], dtype=np.float16),
        "score": np.float32(0.25),
        "count": np.int64(3),
        "ids": {7: 0.5, 11: 1.0},  # token ids as keys: strings, as the json module writes them
        "text": "¿Qué?",
    }
    assert json.loads(to_json(doc)) == {
        "columns": [[0.0, 1.0], [4.0, 5.0], [8.0, 9.0]],
        "half": [0.5, 1.5],
        "score": 0.25,
        "count": 3,
        "ids": {"7": 0.5, "11": 1.0},
        "text": "¿Qué?",
    }
    assert "¿Qué?".encode() in to_json(doc)  # UTF-8, not \\u escapes


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_model_output_is_a_server_error_not_a_null(bad: float) -> None:
    vector = np.array([0.1, bad, 0.3], dtype=np.float32)
    with pytest.raises(ApiError, match="non-finite"):
        to_json({"data": [{"embedding": vector}]})
