"""The text step's raw mode as functions of numpy arrays (``text_step.py`` only moves their tensors): importable and
tested without a server (``tests/unit/test_text_step.py``). (Its search mode is ``search.py``'s.)

One execution of the step in mode raw (``amc_tokenizer``), for the requests the dynamic batcher hands over:

1. :func:`parse_raw` checks each request on its own and reads its queries by the version's text rules
   (``search.read_query``); a request that fails becomes the :class:`RequestError` naming its problem;
2. :func:`admit` takes a slot of the version's in-flight counter (``admission.py``) for each valid request; those
   beyond ``max_in_flight`` become :class:`Overloaded` (answered UNAVAILABLE, never encoded);
3. the step sends the refusals at once (through each request's response sender), then :func:`answer` encodes the
   queries of every admitted request in one encoder call and computes each request's outputs (:func:`outputs`); a
   request that fails there frees its slot.

Refused, with Triton's INVALID_ARGUMENT and a message naming the problem: an empty or whitespace-only query, a query
that normalizes to nothing (text rules 2: only punctuation and spaces, e.g. "?!"), an empty candidate set, text that
is not UTF-8, tensors of inconsistent shapes, and a request over one of the bounds of ``amc_contract.signatures``
(given to the step as config parameters, :class:`Bounds`, the limit named in the message): ``max_candidates`` per
query, ``max_query_bytes``, ``max_keywords`` slots per candidate, ``max_keyword_words`` and ``max_keyword_bytes`` per
keyword.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from amc_contract import RequestError
from amc_contract import signatures as sig

from . import search as search_logic

MODES = ("raw", "search")
# (data_type, rank after the batch dim) of the step's tensors, in the signatures' order; names come from config.
KINDS = {
    "search": ((("TYPE_STRING", 1), ("TYPE_INT64", 1), ("TYPE_INT64", 1)),
               (("TYPE_FP32", 1), ("TYPE_FP32", 2), ("TYPE_FP32", 2), ("TYPE_FP32", 2), ("TYPE_INT64", 1),
                ("TYPE_INT64", 1), ("TYPE_STRING", 1), ("TYPE_STRING", 2))),
    "raw": ((("TYPE_STRING", 1), ("TYPE_STRING", 2), ("TYPE_BOOL", 2)),
            (("TYPE_FP32", 1), ("TYPE_FP32", 3), ("TYPE_FP32", 3), ("TYPE_INT64", 1))),
}


def config_names(config: dict[str, Any], kind: str, mode: str, model_name: str) -> list[str]:
    """Tensor names of ``config[kind]`` ("input" / "output") after checking their count, dtypes and ranks match
    ``mode`` (:data:`KINDS`); a ValueError naming the difference."""
    expected = KINDS[mode][0 if kind == "input" else 1]
    tensors = config.get(kind, [])
    found = tuple((t["data_type"], len(t.get("dims", []))) for t in tensors)
    if found != expected:
        raise ValueError(f"{model_name}: config {kind}s {[t['name'] for t in tensors]} have (dtype, rank) "
                         f"{found}; the {mode} text step needs {expected}")
    return [t["name"] for t in tensors]


@dataclass(frozen=True)
class Bounds:
    """What one query of a request may carry: the config's bounds, named as ``amc_contract.signatures.REQUEST_BOUNDS``
    names them (:meth:`of`)."""

    max_candidates: int
    max_query_bytes: int
    max_keywords: int
    max_keyword_words: int
    max_keyword_bytes: int

    @classmethod
    def of(cls, params: Mapping[str, str]) -> Bounds:
        """The config parameters' bounds, the signatures' where a config lacks one."""
        return cls(**{k: int(params.get(k) or v) for k, v in sig.REQUEST_BOUNDS.items()})


@dataclass(frozen=True)
class RawRules:
    """What :func:`parse_raw` checks a request against: the step's input names (query, keywords, region_mask), the
    bounds, and the version's query reading (``search.QueryText.normalize``, text rules)."""

    names: tuple[str, str, str]
    bounds: Bounds
    normalize: Callable[[str], str]
    text_rules: int


@dataclass
class Parsed:
    """One request after validation: its query texts and its candidates' keywords."""

    texts: list[str]  # normalized by the version's text rules
    keywords: np.ndarray | None = None  # (B, N, K) decoded keyword strings
    counted: bool = True  # holds a slot of the in-flight counter (False where admission counted none)


class Overloaded(Exception):
    """A valid request refused by admission control: answered UNAVAILABLE with this message."""


# ---- a request's checks -----------------------------------------------------------------------------------------
def parse_raw(query: np.ndarray | None, keywords: np.ndarray | None, mask: np.ndarray | None,
              rules: RawRules) -> Parsed:
    """A raw request's inputs (query (B, 1) BYTES, keywords (B, N, K) BYTES, region_mask (B, N, R) BOOL; None where
    absent) -> its :class:`Parsed`, or :class:`RequestError` naming the first problem (in the order the checks have
    always run: the query's shape, the keywords' and the mask's, the bounds, each keyword, then each query's text)."""
    qn, kn, mn = rules.names
    bounds = rules.bounds
    if query is None:
        raise RequestError(f"input {qn} is missing")
    if query.ndim != 2 or query.shape[1] != 1:
        raise RequestError(f"{qn} must have shape [batch, 1], got {list(query.shape)}")
    if keywords is None:
        raise RequestError(f"input {kn} is missing")
    if keywords.ndim != 3 or keywords.shape[0] != query.shape[0]:
        raise RequestError(f"{kn} must have shape [batch, candidates, keywords] with the {qn}'s batch "
                           f"size {query.shape[0]}, got {list(keywords.shape)}")
    batch, n, k = keywords.shape
    # This step sees region_mask (small) rather than regions (large) only to catch this early: VAN and
    # LAN would otherwise fail deep in MTN with an opaque shape error.
    if mask is None:
        raise RequestError(f"input {mn} is missing")
    if mask.shape[:2] != (batch, n):
        raise RequestError(f"{kn} has {n} candidates per query but {mn} has "
                           f"{mask.shape[1] if mask.ndim > 1 else '?'} (shapes {list(keywords.shape)} and "
                           f"{list(mask.shape)}): every candidate needs regions and a keyword list, "
                           "padded with '' to equal lengths")
    check_candidates(n, bounds.max_candidates)
    if mask.ndim != 3 or mask.shape[2] == 0:
        raise RequestError(f"{mn} has no region per candidate (shape {list(mask.shape)}); every candidate "
                           "needs at least one region")
    if k == 0:
        raise RequestError(f"{kn} has no keyword slot per candidate; pad with '' to at least 1")
    if k > bounds.max_keywords:
        raise RequestError(f"{kn} has {k} keyword slots per candidate, more than the maximum of "
                           f"{bounds.max_keywords}")
    parsed = Parsed([], keywords=read_keywords(keywords, kn, bounds))
    for b in range(query.shape[0]):
        parsed.texts.append(search_logic.read_query(
            query[b, 0], qn if query.shape[0] == 1 else f"{qn} {b} of the batch", max_bytes=bounds.max_query_bytes,
            normalize=rules.normalize, rules=rules.text_rules))
    return parsed


def check_candidates(n: int, max_candidates: int) -> None:
    if n == 0:
        raise RequestError("candidate set is empty")
    if n > max_candidates:
        raise RequestError(f"{n} candidates exceed the maximum of {max_candidates}")


def read_keywords(keywords: np.ndarray, name: str, bounds: Bounds) -> np.ndarray:
    """(B, N, K) BYTES keywords -> their strings, or :class:`RequestError` naming the first place a bad one occurs
    (``keywords[query, candidate, keyword]``): over ``max_keyword_bytes`` or ``max_keyword_words``, or not UTF-8.
    Candidate sets repeat the same tags many times: each distinct string is decoded and checked once."""
    distinct, inverse = np.unique(keywords.reshape(-1), return_inverse=True)
    decoded = []
    for u, value in enumerate(distinct):
        try:
            if len(value) > bounds.max_keyword_bytes:
                raise RequestError(f"{name} is {len(value)} bytes long, more than the maximum of "
                                   f"{bounds.max_keyword_bytes} bytes of UTF-8 per keyword")
            text = search_logic.decode(value, name)
            word_count = len(text.split())
            if word_count > bounds.max_keyword_words:
                raise RequestError(f"{name} has {word_count} words, more than the maximum of "
                                   f"{bounds.max_keyword_words} words per keyword")
            decoded.append(text)
        except RequestError as e:
            first = np.unravel_index(int(np.argmax(inverse.reshape(-1) == u)), keywords.shape)
            where = ", ".join(str(int(i)) for i in first)
            raise RequestError(str(e).replace(name, f"{name}[{where}]", 1)) from None
    return np.array(decoded, dtype=object)[inverse.reshape(-1)].reshape(keywords.shape)


# ---- admission --------------------------------------------------------------------------------------------------
def admit(parsed: list[Parsed | Exception], in_flight: Any, model_name: str,
          version: int) -> tuple[list[Parsed | Exception], str | None]:
    """Take a slot of ``in_flight`` (``admission.InFlight``, None: no counter) for each valid request; the requests
    beyond its limit become :class:`Overloaded`. Also returns a warning to log, where the counter file is unusable
    (gone, unwritable): then every request is admitted uncounted, served rather than refused."""
    counted = [i for i, p in enumerate(parsed) if isinstance(p, Parsed)]
    if in_flight is None or not counted:
        for p in parsed:
            if isinstance(p, Parsed):
                p.counted = False
        return parsed, None
    try:
        taken, before = in_flight.admit(len(counted))
    except OSError as e:
        for i in counted:
            parsed[i].counted = False
        return parsed, f"{model_name}: in-flight counter unusable ({e}); admitting"
    if taken == len(counted):
        return parsed, None
    message = (f"{model_name}: overloaded: {before + taken} requests in flight through version "
               f"{version}, the limit is {in_flight.limit}; retry after a backoff")
    out = list(parsed)
    for i in counted[taken:]:
        out[i] = Overloaded(message)
    return out, None


# ---- the answers ------------------------------------------------------------------------------------------------
def answer(parsed: Sequence[Parsed | Exception], features: Any, names: Sequence[str], version: int,
           release: Callable[[int], None]) -> list[dict[str, np.ndarray] | Exception]:
    """Each request's outputs by name (:func:`outputs`), or its exception: those of ``parsed`` as they are, the
    encoder's for the requests it failed, a request's own where its outputs failed. The queries of every request go
    through ``features`` (``TextFeatures``) in one encoder call. ``release(n)``: free ``n`` in-flight slots of the
    admitted requests that go no further."""
    texts = [t for p in parsed if isinstance(p, Parsed) for t in p.texts]
    out: list[Any] = list(parsed)
    try:
        query_text = features.query_text(texts, normalized=True)
    except Exception as e:  # noqa: BLE001 - the requests to encode fail, the others are answered
        release(sum(p.counted for p in parsed if isinstance(p, Parsed)))
        return [e if isinstance(p, Parsed) else p for p in parsed]
    start = 0
    for i, p in enumerate(out):
        if isinstance(p, Exception):
            continue
        try:
            out[i] = outputs(p, query_text[start:start + len(p.texts)], features, names, version)
        except Exception as x:  # noqa: BLE001
            release(int(p.counted))  # admitted, but it goes no further
            out[i] = x
        start += len(p.texts)
    return out


def outputs(p: Parsed, query_text: np.ndarray, features: Any, names: Sequence[str],
            version: int) -> dict[str, np.ndarray]:
    """One request's outputs by name, C-contiguous, in the step's order. ``query_text``: its queries' embeddings
    (B, E)."""
    arrays = [query_text, features.keyword_embeddings(p.keywords),  # (B, N, K, E)
              features.lexical(p.texts, p.keywords, normalized=True),  # (B, N, K, 3)
              np.full((len(p.texts), 1), version, dtype=np.int64)]
    return {name: np.ascontiguousarray(a) for name, a in zip(names, arrays, strict=True)}
