"""Whole-store search: a query (and optionally a filter of store rows) -> the top k of the server's candidate store.

Design. A model version published with a candidate store (``export.store.publish_store``: every gallery image's
projected region features and keyword projections, precomputed and held by the version's graphs) serves the
ensemble ``amc_search`` (``amc_search_v<N>`` pinned): the request is the query, ``top_k`` and, optionally,
``candidate_ids`` (store rows to search among); no candidate list means the whole store. One request scores
every row in one pass of each step:

    store text step    checks the request; the query's WordPiece ids and its content words, numbered as the
                       store numbers its keywords' words (``amc_text.StoreWords``), with their IDFs
    amc_search_store   the sentence encoder, the lexical match against every stored keyword, QEN, VAN, LAN and
                       MTN in one ONNX graph over all the rows (batched gathers of the stored projections and
                       keyword word numbers) and the top-k selection (ONNX TopK) in the same graph: only the k
                       rows kept leave it, so no per-row tensor of the store crosses the Python backend
    amc_store_topk     the store's id and keyword strings of the k rows: what the client needs to explain a
                       result without a copy of the store

The response is k rows, whatever the store size. The client sends a few bytes and validates what it can
(query, ``top_k`` >= 1, the filter's rows distinct and non-negative, ``top_k`` within the filter); the store's
size is the server's to check (the store text step, before any row is scored: ``top_k`` above the rows searched,
rows outside the store or repeated: INVALID_ARGUMENT naming the problem).
Canary routing does not apply: ``search`` goes to ``amc_search`` (the version :func:`export.repository.set_store_serving`
pinned), or to ``amc_search_v<N>`` with ``model_version``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import signatures as sig
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


def pack_search(query: str, top_k: int | None, rows: np.ndarray | None) -> dict[str, np.ndarray]:
    """``amc_search``'s inputs (by tensor name) for one query."""
    arrays = {sig.QUERY.name: np.array([[query.encode("utf-8")]], dtype=object)}
    if top_k is not None:
        arrays[sig.TOP_K.name] = np.array([[top_k]], dtype=np.int64)
    if rows is not None:
        arrays[sig.SEARCH_IDS.name] = rows.reshape(1, -1)
    return arrays


def results(result: Any, model: str, pinned: int | None) -> list[RankedResult]:
    """tritonclient's answer of ``model`` -> the results, after checking every output came and the version."""
    outputs = {name: result.as_numpy(name) for name in sig.SEARCH_ENSEMBLE.output_names}
    missing = [name for name, value in outputs.items() if value is None]
    if missing:
        raise AMCError(f"{model!r} answered without the outputs {missing}")
    answered = int(outputs[sig.MODEL_VERSION.name].reshape(-1)[0])
    if answered == sig.MIXED_VERSION or (pinned is not None and answered != pinned):
        raise MixedVersionError(f"{model!r} answered with model version {answered}"
                                + ("" if pinned is None else f", not the pinned {pinned}"))
    return unpack_search(outputs, answered)


def unpack_search(outputs: Mapping[str, np.ndarray], version: int) -> list[RankedResult]:
    """``amc_search``'s outputs for one query -> its results, best first."""
    ids = outputs[sig.STORED_IDS.name][0]
    keywords = outputs[sig.STORED_KEYWORDS.name][0]
    rows = outputs[sig.CANDIDATE_INDEX.name][0]
    scores = outputs[sig.SCORES.name][0]
    order = np.argsort(-scores, kind="stable")  # the server answers best first with top_k; all rows otherwise
    return [explained(_text(ids[j]), rank, float(scores[j]), outputs[sig.MODALITY_WEIGHTS.name][0, j],
                      [_text(k) for k in keywords[j]], outputs[sig.KEYWORD_ATTENTION.name][0, j],
                      outputs[sig.REGION_ATTENTION.name][0, j], version, store_row=int(rows[j]))
            for rank, j in enumerate(order.tolist(), start=1)]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
