"""Whole-store search: a query (and optionally a filter of store rows) -> the top k of the server's candidate store.

Design. A model version published with a candidate store (``export.store.publish_store``: every gallery image's
projected region features and keyword projections, precomputed and held by the version's graphs) serves the
ensemble ``amc_search`` (``amc_search_v<N>`` pinned): the request is the query, ``top_k`` and, optionally,
``candidate_ids`` (store rows to search among); no candidate list means the whole store. One request is one
Python step on the server, ``amc_search_step`` (issue 23), which scores every row in one pass:

    checks the request; the query's WordPiece ids and its content words, numbered as the store numbers its
    keywords' words (``amc_contract.text.StoreWords``), with their IDFs; then the search graph: the sentence encoder, the
    lexical match against every stored keyword, QEN, VAN, LAN and MTN over all the rows (batched gathers of the
    stored projections and keyword word numbers) and the top-k selection (ONNX TopK): only the k rows kept leave
    it, so no per-row tensor of the store crosses the Python backend; last the store's id and keyword strings of
    the k rows: what the client needs to explain a result without a copy of the store

The response is k rows, whatever the store size. The client sends a few bytes and validates what it can
(query, ``top_k`` >= 1, the filter's rows distinct and non-negative, ``top_k`` within the filter); the store's
size is the server's to check (the search step, before any row is scored: ``top_k`` above the rows searched,
rows outside the store or repeated: INVALID_ARGUMENT naming the problem).
``search`` goes to ``amc_search`` (the version :func:`export.repository.set_store_serving` pinned, which follows the
serving version), a canary's share to ``amc_search_v<canary>`` where the canary has a store (``canary_search`` in
``amc``'s routing), or to ``amc_search_v<N>`` with ``model_version``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from amc_contract import signatures as sig

from ._packing import check_query, check_request_query, check_top_k, explained
from ._types import RankedResult
from .errors import AMCError, InvalidInputError, MixedVersionError


def check_search(query: object, top_k: object, ids: Sequence[int] | np.ndarray | None,
                 validate: bool = True) -> tuple[str, np.ndarray | None]:
    """The client-side checks of a search; returns the query and the filter as int64 (N,) (or None)."""
    text = check_query(query)
    check_top_k(top_k)
    rows = None
    if ids is not None:
        array = np.asarray(ids)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise InvalidInputError(f"ids must be a list of store rows (ints), got {type(ids).__name__} of "
                                    f"{array.dtype} with shape {array.shape}")
        rows = array.astype(np.int64)
    if not validate:
        return text, rows
    check_request_query(text)
    if rows is not None:
        if rows.size == 0:
            raise InvalidInputError("ids is empty: give at least one store row, or None to search the whole store")
        if (rows < 0).any():
            raise InvalidInputError(f"ids holds {int(rows[rows < 0][0])}: store rows are >= 0")
        distinct, counts = np.unique(rows, return_counts=True)
        if (counts > 1).any():
            raise InvalidInputError(f"store row {int(distinct[counts > 1][0])} appears more than once in ids")
    check_top_k(top_k, [] if rows is None else [len(rows)])
    return text, rows


def check_search_many(queries: Sequence[str], top_k: object, ids: Sequence[int] | np.ndarray | None,
                      validate: bool = True) -> tuple[list[str], np.ndarray | None]:
    """:func:`check_search` for several queries that share ``top_k`` and the filter ``ids``; a bad query is named by
    its index (``queries[3]: query is empty``)."""
    if isinstance(queries, str | bytes) or not isinstance(queries, Sequence | np.ndarray):
        raise InvalidInputError(f"queries must be a list of strings, got {type(queries).__name__}")
    if not len(queries):
        raise InvalidInputError("queries is empty: give at least one query")
    texts, rows = [], None
    for i, query in enumerate(queries):
        try:
            text, rows = check_search(query, top_k, ids if i == 0 else rows, validate)
        except InvalidInputError as e:
            if i == 0 and "query" not in str(e):  # top_k's or the filter's problem: not the query's
                raise
            raise InvalidInputError(f"queries[{i}]: {e}") from e
        texts.append(text)
    return texts, rows


def pack_search(queries: Sequence[str], top_k: int | None, rows: np.ndarray | None) -> dict[str, np.ndarray]:
    """``amc_search``'s inputs (by tensor name) for one request of ``queries`` (at most sig.SEARCH_MAX_BATCH),
    which share ``top_k`` and the filter ``rows``."""
    count = len(queries)
    arrays = {sig.QUERY.name: np.array([[q.encode("utf-8")] for q in queries], dtype=object)}
    if top_k is not None:
        arrays[sig.TOP_K.name] = np.full((count, 1), top_k, dtype=np.int64)
    if rows is not None:
        arrays[sig.SEARCH_IDS.name] = np.ascontiguousarray(np.broadcast_to(rows, (count, len(rows))))
    return arrays


def results(result: Any, model: str, pinned: int | None, count: int = 1) -> list[list[RankedResult]]:
    """tritonclient's answer of ``model`` to ``count`` queries -> each query's results, after checking every output
    came and the version."""
    outputs = {name: result.as_numpy(name) for name in sig.SEARCH_ENSEMBLE.output_names}
    missing = [name for name, value in outputs.items() if value is None]
    if missing:
        raise AMCError(f"{model!r} answered without the outputs {missing}")
    if outputs[sig.SCORES.name].shape[0] != count:
        raise AMCError(f"{model!r} answered {outputs[sig.SCORES.name].shape[0]} queries, not the {count} sent")
    answered = outputs[sig.MODEL_VERSION.name].reshape(-1)
    for version in answered.tolist():
        if version == sig.MIXED_VERSION or (pinned is not None and version != pinned):
            raise MixedVersionError(f"{model!r} answered with model version {version}"
                                    + ("" if pinned is None else f", not the pinned {pinned}"))
    return [unpack_search(outputs, int(answered[b]), b) for b in range(count)]


def unpack_search(outputs: Mapping[str, np.ndarray], version: int, b: int = 0) -> list[RankedResult]:
    """``amc_search``'s outputs for query ``b`` of the request -> its results, best first."""
    ids = outputs[sig.STORED_IDS.name][b]
    keywords = outputs[sig.STORED_KEYWORDS.name][b]
    rows = outputs[sig.CANDIDATE_INDEX.name][b]
    scores = outputs[sig.SCORES.name][b]
    order = np.argsort(-scores, kind="stable")  # the server answers best first with top_k; all rows otherwise
    return [explained(_text(ids[j]), rank, float(scores[j]), outputs[sig.MODALITY_WEIGHTS.name][b, j],
                      [_text(k) for k in keywords[j]], outputs[sig.KEYWORD_ATTENTION.name][b, j],
                      outputs[sig.REGION_ATTENTION.name][b, j], version, store_row=int(rows[j]))
            for rank, j in enumerate(order.tolist(), start=1)]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
