"""Server-side top-k and whole-store search without a server: the top-k step's selection and checks, and the client's
validation, packing and unpacking (the store's keyword index against the lexical matcher: ``test_text.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from amc_client import AMCClient, Candidate, InvalidInputError, _packing, _search
from amc_contract import RequestError
from amc_contract import signatures as sig
from serving.backends.top_k import best_first, check_top_k

D = sig.REGION_FEATURE_DIM


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 9, 10])
def test_best_first_is_the_stable_sort_without_sorting_everything(k):
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.5, -1.0, 0.3, 0.5, 0.2], dtype=np.float32)  # ties on purpose
    np.testing.assert_array_equal(best_first(scores, k), np.argsort(-scores, kind="stable")[:k])
    rng = np.random.default_rng(k)
    many = rng.integers(0, 20, size=1000).astype(np.float32)
    np.testing.assert_array_equal(best_first(many, 10 * k), np.argsort(-many, kind="stable")[: 10 * k])


@pytest.mark.parametrize(("top_k", "message"), [
    ([[0]], "top_k is 0; it must be at least 1"),
    ([[6]], "top_k is 6, more than the 5 candidates of the request"),
    ([[2], [3]], r"top_k differs between the queries of one request \(\[2, 3\]\)"),
    ([[2, 2]], r"top_k must have shape \[batch, 1\]"),
])
def test_top_k_step_checks(top_k, message):
    array = np.array(top_k, dtype=np.int64)
    with pytest.raises(RequestError, match=message):
        check_top_k(array, len(array) if array.shape[1] == 1 else 1, 5)
    assert check_top_k(np.array([[5], [5]]), 2, 5) == 5


@pytest.mark.parametrize(("top_k", "ids", "message"), [
    (0, None, "top_k must be a positive int or None, got 0"),
    (2.5, None, "top_k must be a positive int"),
    (True, None, "top_k must be a positive int"),
    (3, [1, 2], "top_k 3 is more than the 2 candidates"),
    (1, [], "ids is empty"),
    (1, [4, -2], "ids holds -2"),
    (1, [4, 9, 4], "store row 4 appears more than once in ids"),
    (1, ["a"], "ids must be a list of store rows"),
])
def test_search_validation_happens_before_any_call(top_k, ids, message):
    class Unreachable:
        def __getattr__(self, name):
            raise AssertionError(f"{name} called")

    with pytest.raises(InvalidInputError, match=message):
        AMCClient("fake:8001", _inner=Unreachable()).search("cat", top_k=top_k, ids=ids)
    with pytest.raises(InvalidInputError, match="query is empty"):
        AMCClient("fake:8001", _inner=Unreachable()).search(" ", top_k=1)


def _cand(cid: str, level: float) -> Candidate:
    return Candidate(cid, np.full((49, D), level, dtype=np.float32), ["cat"])


def test_top_k_goes_to_the_server_only_for_unpadded_sets_and_rows_map_back():
    equal = [_packing.normalize([_cand("a", 0), _cand("b", 1)]), _packing.normalize([_cand("c", 0), _cand("d", 1)])]
    assert _packing.pack(["q", "r"], equal, 1)[sig.TOP_K.name].tolist() == [[1], [1]]
    unequal = [equal[0], _packing.normalize([_cand("e", 0)])]
    assert sig.TOP_K.name not in _packing.pack(["q", "r"], unequal, 1)
    # A server top-1 answer: row 0 is candidate 1 of each query.
    outputs = {"scores": np.array([[0.9], [0.8]], np.float32), "modality_weights": np.full((2, 1, 2), 0.5, np.float32),
               "region_attention": np.full((2, 1, 49), 1 / 49, np.float32), "keyword_attention": np.ones((2, 1, 1)),
               "candidate_index": np.array([[1], [1]])}
    ranked = _packing.unpack(outputs, equal, [3, 3], 1)
    assert [[r.candidate_id for r in q] for q in ranked] == [["b"], ["d"]]
    assert ranked[0][0].score == pytest.approx(0.9) and ranked[0][0].top_keywords == [("cat", 1.0)]


def test_unpack_search_reads_the_store_strings():
    outputs = {"scores": np.array([[0.7, 0.9]], np.float32), "modality_weights": np.array([[[0.2, 0.8], [0.6, 0.4]]]),
               "region_attention": np.full((1, 2, 49), 1 / 49), "keyword_attention": np.array([[[0.3, 0.7], [1, 0]]]),
               "candidate_index": np.array([[12, 4]]), "model_version": np.array([[2]]),
               "stored_ids": np.array([[b"cat \xf0\x9f\x90\xb1", b"dog"]], dtype=object),
               "stored_keywords": np.array([[[b"cat", b"pet"], [b"dog", b""]]], dtype=object)}
    results = _search.unpack_search(outputs, 2)
    assert [(r.candidate_id, r.store_row, r.rank) for r in results] == [("dog", 4, 1), ("cat 🐱", 12, 2)]
    assert results[1].top_keywords == [("pet", pytest.approx(0.7)), ("cat", pytest.approx(0.3))]
    assert results[0].top_keywords == [("dog", 1.0)] and results[0].visual_weight == pytest.approx(0.6)
    packed = _search.pack_search(["cat"], 5, np.array([3, 1]))
    assert packed["top_k"].tolist() == [[5]] and packed["candidate_ids"].tolist() == [[3, 1]]
    assert set(_search.pack_search(["cat"], None, None)) == {"query"}
    many = _search.pack_search(["cat", "dog", "red heart"], 4, np.array([3, 1, 7, 9]))  # one request, shared filter
    assert many["query"].tolist() == [[b"cat"], [b"dog"], [b"red heart"]] and many["top_k"].tolist() == [[4]] * 3
    assert many["candidate_ids"].tolist() == [[3, 1, 7, 9]] * 3


@pytest.mark.parametrize(("queries", "top_k", "ids", "message"), [
    (["cat", "  ", "dog"], 3, None, r"queries\[1\]: query is empty"),
    (["cat", 7], 3, None, r"queries\[1\]: query must be a string, got int"),
    ([], 3, None, "queries is empty"),
    ("cat", 3, None, "queries must be a list of strings, got str"),
    (["cat", "dog"], 0, None, "top_k must be a positive int or None, got 0"),
    (["cat", "dog"], 3, [4, 4, 1], "store row 4 appears more than once in ids"),
    (["cat", "dog"], 3, [4, 1], "top_k 3 is more than the 2 candidates"),
])
def test_search_many_names_the_bad_query_or_argument(queries, top_k, ids, message):
    with pytest.raises(InvalidInputError, match=message):
        _search.check_search_many(queries, top_k, ids)
    texts, rows = _search.check_search_many(["cat", "dog"], 2, [5, 1])
    assert texts == ["cat", "dog"] and rows.tolist() == [5, 1]
