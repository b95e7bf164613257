"""The top-k step (``amc_topk``, ``serving/backends/top_k.py``) without a server: :func:`select` and the step
in-process with the shared fake ``pb_utils``. Every bad ``top_k`` that tests/integration/test_serving.py sends through
the ``amc`` ensemble is refused here with the same message (``check_top_k`` alone: tests/unit/test_search.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from amc_contract import RequestError
from amc_contract import signatures as sig
from serving.backends import top_k
from serving.backends.admission import InFlight
from tests import fake_pb_utils

NAMES = sig.TOPK.input_names[:-1]


def candidates(batch: int = 2, n: int = 6, seed: int = 0) -> list[np.ndarray]:
    """Every candidate's scores, modality weights, region and keyword attention, with ties among the scores."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(batch, n)).astype(np.float32)
    return [scores, rng.random((batch, n, 2), np.float32), rng.random((batch, n, 49), np.float32),
            rng.random((batch, n, 5), np.float32)]


@pytest.mark.parametrize(("k", "n", "message"), [  # tests/integration/test_serving.py
    ([[0]], 2, "top_k is 0; it must be at least 1"),
    ([[-3]], 2, "top_k is -3; it must be at least 1"),
    ([[3]], 2, "top_k is 3, more than the 2 candidates of the request"),
    ([[4]], 3, "top_k is 4, more than the 3 candidates of the request"),
    ([[2], [3]], 5, "top_k differs between the queries of one request ([2, 3]); send one value, or one request per "
                    "value"),
    ([[2], [0]], 5, "top_k is 0 (query 1 of the batch); it must be at least 1"),
    ([[1, 2]], 5, "top_k must have shape [batch, 1] = [1, 1], got [1, 2]"),
])
def test_a_bad_top_k_is_refused_naming_the_problem(k, n, message):
    k = np.array(k, dtype=np.int64)
    with pytest.raises(RequestError) as info:
        top_k.select(candidates(batch=len(k) if k.shape[1] == 1 else 1, n=n), k, NAMES)
    assert str(info.value) == message


def test_missing_inputs_are_named():
    arrays = candidates()
    with pytest.raises(RequestError, match=r"^inputs \['candidate_scores', 'candidate_keyword_attention'\] are "
                                           r"missing$"):
        top_k.select([None, arrays[1], arrays[2], None], None, NAMES)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_the_top_k_rows_are_the_full_rankings_first_with_their_own_outputs(k):
    arrays = candidates()
    out = top_k.select(arrays, np.full((2, 1), k, np.int64), NAMES)
    for b in range(2):
        order = np.argsort(-arrays[0][b], kind="stable")[:k]  # the client's own ordering: ties by position
        assert out[4][b].tolist() == order.tolist()
        for got, given in zip(out[:4], arrays, strict=True):
            np.testing.assert_array_equal(got[b], given[b][order])
    assert [a.shape[:2] for a in out] == [(2, k)] * 5 and out[4].dtype == np.int64
    assert all(a.flags.c_contiguous for a in out)


def test_without_top_k_every_candidate_comes_back_in_request_order():
    arrays = candidates()
    out = top_k.select(arrays, None, NAMES)
    assert out[4].tolist() == [list(range(6))] * 2
    for got, given in zip(out[:4], arrays, strict=True):
        np.testing.assert_array_equal(got, given)


def test_the_step_answers_each_request_and_frees_a_slot_per_request_in_process(tmp_path):
    from export.repository import TOP_K_MODULE, write_step_code

    here = tmp_path / sig.TOPK.model_name
    write_step_code(here / "1", TOP_K_MODULE)
    config = {"input": [{"name": n} for n in sig.TOPK.input_names],
              "output": [{"name": n} for n in sig.TOPK.output_names],
              "parameters": {"mode": {"string_value": "raw"}}}
    counter = InFlight(tmp_path / "counter")
    counter.admit(3)
    with fake_pb_utils.installed() as pb_utils:
        step = fake_pb_utils.load_step(here / "1" / "model.py").TritonPythonModel()
        step.initialize({"model_config": json.dumps(config), "model_name": sig.TOPK.model_name,
                         "model_version": "1", "model_repository": str(here)})
        step.in_flight = InFlight(tmp_path / "counter")
        arrays = dict(zip(NAMES, candidates(batch=1), strict=True))
        requests = [pb_utils.InferenceRequest({**arrays, sig.TOP_K.name: np.array([[2]], np.int64)}),
                    pb_utils.InferenceRequest({**arrays, sig.TOP_K.name: np.array([[9]], np.int64)}),
                    pb_utils.InferenceRequest(arrays)]
        answers = step.execute(requests)
        step.finalize()
    assert counter.in_flight() == 0  # one slot per request answered, ok or not
    assert list(fake_pb_utils.outputs(answers[0])) == sig.TOPK.output_names
    assert fake_pb_utils.outputs(answers[0])[sig.CANDIDATE_INDEX.name].shape == (1, 2)
    assert answers[1].error().message() == "amc_topk: top_k is 9, more than the 6 candidates of the request"
    assert answers[1].error().code() == pb_utils.TritonError.INVALID_ARG
    assert fake_pb_utils.outputs(answers[2])[sig.CANDIDATE_INDEX.name].tolist() == [list(range(6))]
