"""The Python-backend steps' request checks, in-process and without a server (tests/test_serving.py sends the
same mistakes to a real tritonserver)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.backends.onnx_runner import RequestError, TritonPythonModel


def _runner(distinct: list[str]) -> TritonPythonModel:
    runner = TritonPythonModel.__new__(TritonPythonModel)  # no session: only the check under test
    runner.distinct = distinct
    return runner


def test_inputs_named_distinct_repeat_no_value_within_a_query() -> None:
    runner = _runner(["query_words"])
    padded = np.array([[4, 9, -1, -1], [2, -1, -1, -1]], dtype=np.int64)  # repeated padding is fine
    runner._check_distinct({"query_words": padded, "other": np.zeros((2, 4))})
    runner._check_distinct({"query_words": np.array([[3]], dtype=np.int64)})
    with pytest.raises(RequestError, match=r"query_words\[1\] repeats 7; each value may appear once"):
        runner._check_distinct({"query_words": np.array([[1, 2, 3], [7, -1, 7]], dtype=np.int64)})
    _runner([])._check_distinct({"query_words": np.array([[7, 7]], dtype=np.int64)})  # not named: not checked
