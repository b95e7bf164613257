"""Request packing and response unpacking: candidates <-> the `amc` ensemble's padded tensors; the answer's checks
(every output came, the model version) before it is unpacked."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from amc_contract import signatures as sig

from ._types import Candidate, CandidateArrays, RankedResult
from .errors import AMCError, InvalidInputError, MixedVersionError

CandidateSet = Sequence[Candidate] | CandidateArrays

# Cap on one request's padded region tensor: rank_many splits a group of queries before it grows past this
# (gRPC's own limit is 2 GiB; 1000 candidates x 49 x 1280 float32 is 250 MB per query).
MAX_REQUEST_BYTES = 1 << 30


@dataclass(frozen=True, eq=False)
class _Set:
    """One query's candidates, normalised: (N, R, D) regions, (N, R) mask, (N, K) keywords, (N,) region counts."""

    ids: tuple[str, ...]
    regions: np.ndarray
    region_mask: np.ndarray
    keywords: np.ndarray
    n_regions: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def normalize(candidates: CandidateSet) -> _Set:
    """A list of :class:`Candidate` or a :class:`CandidateArrays` -> one padded candidate set."""
    if isinstance(candidates, CandidateArrays):
        n, r = candidates.regions.shape[:2]
        mask = candidates.region_mask if candidates.region_mask is not None else np.ones((n, r), dtype=bool)
        return _Set(candidates.ids, candidates.regions, mask, _compact(candidates.keywords), np.full(n, r))
    if isinstance(candidates, Candidate) or not isinstance(candidates, Sequence):
        raise InvalidInputError(
            f"candidates must be a list of Candidate or a CandidateArrays, got {type(candidates).__name__}"
        )
    for i, c in enumerate(candidates):
        if not isinstance(c, Candidate):
            raise InvalidInputError(f"candidate {i} is a {type(c).__name__}, not a Candidate")
    n = len(candidates)
    r = max((len(c.regions) for c in candidates), default=1)
    k = max((len(c.keywords) for c in candidates), default=0)
    regions = np.zeros((n, r, sig.REGION_FEATURE_DIM), dtype=np.float32)
    mask = np.zeros((n, r), dtype=bool)
    keywords = np.full((n, k), "", dtype=object)
    for i, c in enumerate(candidates):
        rc = len(c.regions)
        regions[i, :rc] = c.regions
        mask[i, :rc] = True if c.region_mask is None else c.region_mask
        keywords[i, : len(c.keywords)] = c.keywords
    return _Set(
        tuple(c.id for c in candidates),
        regions,
        mask,
        keywords,
        np.array([len(c.regions) for c in candidates]),
    )


def _compact(keywords: np.ndarray) -> np.ndarray:
    """(N, K) keywords with more slots than the server takes: each row's real keywords moved to the front
    and the all-padding columns dropped (the server counts slots, padding included, against MAX_KEYWORDS)."""
    if keywords.shape[1] <= sig.MAX_KEYWORDS:
        return keywords
    rows = [[k for k in row if k] for row in keywords.tolist()]
    out = np.full((len(rows), max([0, *map(len, rows)])), "", dtype=object)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def check_query(query: object) -> str:
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a string, got {type(query).__name__}")
    return query


def check_request_query(query: str) -> None:
    """A query the server takes: not blank, at most MAX_QUERY_BYTES of UTF-8."""
    if not query.strip():
        raise InvalidInputError("query is empty")
    size = len(query.encode("utf-8", errors="surrogatepass"))
    if size > sig.MAX_QUERY_BYTES:
        raise InvalidInputError(
            f"query {query[:40]!r}... is {size} bytes of UTF-8, more than the limit of {sig.MAX_QUERY_BYTES}"
        )


def check_request(query: str, cands: _Set) -> None:
    """The client-side checks that the server also makes (skipped with ``validate=False``)."""
    check_request_query(query)
    # Any other text is searchable: the server's sentence encoder reads every script, emoji included.
    if len(cands) == 0:
        raise InvalidInputError(f"query {query!r}: the candidate set is empty")
    if len(cands) > sig.MAX_CANDIDATES:
        raise InvalidInputError(
            f"query {query!r}: {len(cands)} candidates, more than the server's limit of {sig.MAX_CANDIDATES}; "
            "split the set into several requests"
        )
    check_keywords(cands)
    dup = next((i for i, count in Counter(cands.ids).items() if count > 1), None)
    if dup is not None:
        raise InvalidInputError(f"query {query!r}: candidate id {dup!r} appears more than once")


def check_keywords(cands: _Set) -> None:
    """The keyword bounds of :mod:`.signatures`: slots per candidate, words and bytes per keyword."""
    if cands.keywords.shape[1] > sig.MAX_KEYWORDS:  # normalize() dropped the padding columns: real keywords
        counts = (cands.keywords != "").sum(axis=1)
        i = int(np.argmax(counts))
        raise InvalidInputError(
            f"candidate {cands.ids[i]!r} has {int(counts[i])} keywords, more than the limit of {sig.MAX_KEYWORDS}"
        )
    for k in dict.fromkeys(cands.keywords.reshape(-1).tolist()):
        size = len(k.encode("utf-8", errors="surrogatepass"))
        if size > sig.MAX_KEYWORD_BYTES:
            raise InvalidInputError(
                f"keyword {k[:40]!r}... is {size} bytes of UTF-8, more than the limit of {sig.MAX_KEYWORD_BYTES}"
            )
        words = len(k.split())
        if words > sig.MAX_KEYWORD_WORDS:
            raise InvalidInputError(
                f"keyword {k[:40]!r}... has {words} words, more than the limit of {sig.MAX_KEYWORD_WORDS}"
            )


def check_top_k(top_k: object, sizes: Sequence[int] = ()) -> None:
    """``top_k``: None or an int from 1 to the size of every candidate set (``sizes``), as the server checks."""
    if top_k is None:
        return
    if not isinstance(top_k, int | np.integer) or isinstance(top_k, bool) or top_k < 1:
        raise InvalidInputError(f"top_k must be a positive int or None, got {top_k!r}")
    small = [n for n in sizes if top_k > n]
    if small:
        raise InvalidInputError(f"top_k {top_k} is more than the {min(small)} candidates of a query; ask for at most "
                                "as many results as there are candidates")


def pack(queries: Sequence[str], sets: Sequence[_Set], top_k: int | None = None) -> dict[str, np.ndarray]:
    """B queries with their candidate sets -> the ensemble's inputs, padded to the largest N, R and K.

    Padding: zero regions with ``region_mask`` False, ``""`` keywords; padded candidates are dropped by
    :func:`unpack`. A lone query whose set needs no padding is sent without copying its regions. ``top_k`` goes to
    the server (which then answers only the top k of each query) only when no set is padded: padded candidates
    could take places in a server-side top k, so unequal sets are cut by :func:`unpack` instead.
    """
    b = len(queries)
    n = max([1, *(len(s) for s in sets)])
    r = max([1, *(s.regions.shape[1] for s in sets)])
    k = max([1, *(s.keywords.shape[1] for s in sets)])
    query = np.array([[q.encode("utf-8")] for q in queries], dtype=object).reshape(b, 1)
    if b == 1 and sets[0].regions.shape[:2] == (n, r):
        regions = sets[0].regions[None]
    else:
        regions = np.zeros((b, n, r, sig.REGION_FEATURE_DIM), dtype=np.float32)
        for i, s in enumerate(sets):
            regions[i, : len(s), : s.regions.shape[1]] = s.regions
    mask = np.zeros((b, n, r), dtype=bool)
    keywords = np.full((b, n, k), b"", dtype=object)
    for i, s in enumerate(sets):
        mask[i, : len(s), : s.region_mask.shape[1]] = s.region_mask
        keywords[i, : len(s), : s.keywords.shape[1]] = _utf8(s.keywords)
    arrays = {
        sig.QUERY.name: query,
        sig.REGIONS.name: regions,
        sig.REGION_MASK.name: mask,
        sig.KEYWORDS.name: keywords,
    }
    if top_k is not None and all(len(s) == n for s in sets):
        arrays[sig.TOP_K.name] = np.full((b, 1), top_k, dtype=np.int64)
    return arrays


def _utf8(strings: np.ndarray) -> np.ndarray:
    flat = [k.encode("utf-8") for k in strings.reshape(-1)]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(strings.shape)


def groups(sets: Sequence[_Set]) -> list[range]:
    """Split queries into requests of at most MAX_BATCH queries and about MAX_REQUEST_BYTES of regions."""
    out: list[range] = []
    start, n, r = 0, 0, 0
    for i, s in enumerate(sets):
        n2, r2 = max(n, len(s)), max(r, s.regions.shape[1])
        size = (i - start + 1) * n2 * r2 * sig.REGION_FEATURE_DIM * 4
        if i > start and (i - start >= sig.MAX_BATCH or size > MAX_REQUEST_BYTES):
            out.append(range(start, i))
            start, n2, r2 = i, len(s), s.regions.shape[1]
        n, r = n2, r2
    if start < len(sets):
        out.append(range(start, len(sets)))
    return out


def results(
    result: Any, model: str, expected: int | None, sets: Sequence[_Set], top_k: int | None
) -> list[list[RankedResult]]:
    """tritonclient's answer of ``model`` to a rank request -> each query's results, after checking that every
    output came and the model version (``expected``: the pinned or canary version asked for, or None)."""
    outputs = {name: result.as_numpy(name) for name in sig.ENSEMBLE.output_names}
    # candidate_index is absent from servers without the top-k step: their rows are the request's order.
    missing = [name for name, value in outputs.items() if value is None and name != sig.CANDIDATE_INDEX.name]
    if missing:
        raise AMCError(f"{model!r} answered without the outputs {missing}")
    versions = outputs[sig.MODEL_VERSION.name].reshape(-1)[: len(sets)]
    if (versions == -1).any():
        raise MixedVersionError(
            f"{model!r} answered with a mixed-version response (model_version -1: its steps "
            "ran different model versions, as during a rollout); retry the request"
        )
    if expected is not None and (versions != expected).any():
        raise MixedVersionError(
            f"{model!r} should answer with model version {expected}, "
            f"but version {int(versions[versions != expected][0])} answered"
        )
    return unpack(outputs, sets, versions.tolist(), top_k)


def unpack(
    outputs: Mapping[str, np.ndarray], sets: Sequence[_Set], versions: Sequence[int], top_k: int | None = None
) -> list[list[RankedResult]]:
    """The ensemble's outputs -> per query, its real candidates ranked by score (highest first).

    Row j of the outputs is candidate ``candidate_index[b, j]`` of the request (all N in request order when the
    server did no top-k, or answered no ``candidate_index``; the top k, best first, when it did)."""
    scores = outputs[sig.SCORES.name]  # (B, M): M = N, or k after a server-side top-k
    weights = outputs[sig.MODALITY_WEIGHTS.name]  # (B, M, 2)
    region_att = outputs[sig.REGION_ATTENTION.name]  # (B, M, R)
    keyword_att = outputs[sig.KEYWORD_ATTENTION.name]  # (B, M, K)
    index = outputs.get(sig.CANDIDATE_INDEX.name)
    if index is None:
        index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)  # (B, M)
    ranked: list[list[RankedResult]] = []
    for b, s in enumerate(sets):
        rows = np.flatnonzero(index[b] < len(s))  # padded candidates dropped
        rows = rows[np.argsort(-scores[b, rows], kind="stable")][:top_k]
        results = []
        for rank, j in enumerate(rows.tolist(), start=1):
            i = int(index[b, j])
            results.append(explained(s.ids[i], rank, float(scores[b, j]), weights[b, j], s.keywords[i],
                                     keyword_att[b, j], region_att[b, j, : s.n_regions[i]], int(versions[b])))
        ranked.append(results)
    return ranked


def explained(candidate_id: str, rank: int, score: float, weights: np.ndarray, keywords: Sequence[str],
              keyword_attention: np.ndarray, region_attention: np.ndarray, version: int, *,
              store_row: int | None = None) -> RankedResult:
    """One :class:`RankedResult`: keywords by attention (highest first, padding dropped), regions as a 7x7 map."""
    kws = [(kw, float(keyword_attention[j])) for j, kw in enumerate(keywords) if kw]
    kws.sort(key=lambda kv: -kv[1])
    att = np.array(region_attention, dtype=np.float32)
    side = sig.FEATURE_MAP_SIDE
    if att.size == side * side:
        att = att.reshape(side, side)
    return RankedResult(candidate_id=candidate_id, score=score, rank=rank, visual_weight=float(weights[0]),
                        language_weight=float(weights[1]), top_keywords=kws, region_attention=att,
                        model_version=version, store_row=store_row)


def pack_request(
    queries: Sequence[str], candidate_sets: Sequence[CandidateSet], *, validate: bool = True
) -> dict[str, np.ndarray]:
    """The `amc` ensemble's input arrays (by tensor name) for B queries and their candidate sets.

    Useful with a raw ``tritonclient``; :class:`AMCClient` packs for you.
    """
    if len(queries) != len(candidate_sets):
        raise InvalidInputError(f"{len(queries)} queries but {len(candidate_sets)} candidate sets")
    if not queries:
        raise InvalidInputError("no queries")
    qs = [check_query(q) for q in queries]
    sets = [normalize(c) for c in candidate_sets]
    if validate:
        for q, s in zip(qs, sets, strict=True):
            check_request(q, s)
    return pack(qs, sets)
