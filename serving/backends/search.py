"""The search step's logic (``amc_search_step``: ``text_step.py`` in mode search, which only wraps it): functions of
numpy arrays, importable and tested without a server (``tests/unit/test_search_step.py``).

``text_step.py`` and ``text_requests.py`` import it (every mode of the text step reads its queries with
:func:`read_query`); a published version carries it in its vendored ``amc_steps`` package.

One execution of the step, for the requests the dynamic batcher hands over:

1. :func:`proven_ids` checks the candidate ids of all requests at once (one sort); :func:`parse_request` checks each
   request, in the order the messages have always come in (query shape, ids shape, ids in the store and distinct,
   ``top_k``, each query's text), skipping only the id checks already proven, and reads its queries by the
   version's text rules (:meth:`QueryText.normalize`);
2. :func:`search` groups the requests that search as many rows, gets their queries' tokens and numbered words in one
   call per group (:meth:`QueryText.features`), runs the graph (``search_graph.SearchGraph``) and cuts each
   request's answer out of the group's (:func:`gather`): only the outputs it asked for, each a C-contiguous view, the
   store's id and keyword strings gathered by one fancy index per group, with their Triton BYTES serialization joined
   from rows serialized once at load (:class:`StoreStrings`);
3. the step makes one ``pb_utils.Tensor`` per output, BYTES ones through :class:`SerializedBytes`.

Why the per-row serialization: the Python backend serializes a BYTES tensor when it is made, in Python, element by
element (``serialize_byte_tensor`` of ``triton_python_backend_utils``): for the store's keywords that is top_k x
keyword slots elements per query, the most costly part of the step's own Python.

Why one module: it is the search step's logic in the order one execution runs it (the requests read, their queries'
tokens and words, the answers cut out of the graph's), which reads best top to bottom; the graph calls are
``search_graph.py``'s.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from amc_contract import RequestError
from amc_contract import text as amc_text

from .search_graph import SearchGraph, graph_k
from .top_k import check_top_k


# ---- reading a request -------------------------------------------------------------------------------------------
def decode(value: bytes | str, what: str) -> str:
    """UTF-8 text of one BYTES element; ``what`` names it in the error ("query", "keywords[0, 2, 1]")."""
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{what} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at position {e.start})") \
            from None


def read_query(value: bytes | str, where: str, *, max_bytes: int, normalize: Callable[[str], str],
               rules: int) -> str:
    """One query element as the version reads it (``normalize``: its text rules), or :class:`RequestError` naming
    the problem: over ``max_bytes``, not UTF-8, empty, or nothing left once normalized."""
    size = len(value)
    if size > max_bytes:
        raise RequestError(f"{where} is {size} bytes long, more than the maximum of {max_bytes} bytes of UTF-8")
    text = decode(value, where)
    if not text.strip():
        raise RequestError(f"{where} is empty")
    normalized = normalize(text)
    if not normalized:  # text rules 2: only punctuation and spaces
        shown = repr(text) if len(text) <= 60 else repr(text[:60]) + "..."
        raise RequestError(f"{where} {shown} normalizes to nothing: it has no letter, digit or emoji to search "
                           f"for (text rules {rules})")
    return normalized


@dataclass(frozen=True)
class Rules:
    """What :func:`parse_request` checks a request against: the step's input names (query, candidate ids, top_k), its
    version and store size, the query bound and the query reading (:meth:`QueryText.normalize`, text rules). (The
    top_k rule is the top-k step's, ``top_k.check_top_k``.)"""

    names: tuple[str, str, str]
    version: int
    store_size: int
    max_query_bytes: int
    normalize: Callable[[str], str]
    text_rules: int


@dataclass
class Request:
    """One request after its checks."""

    texts: list[str]  # its queries, read by the version's text rules
    rows: np.ndarray  # (B, N) store rows to search (every row, broadcast, where it sent no ids)
    top_k: int | None  # one k for its queries, checked against N; None: every row searched
    wants: frozenset[str] | None = None  # the outputs it asked for (None: every one)


def first_repeat(rows: np.ndarray) -> tuple[int, int] | None:
    """(B, n) non-negative integer rows -> (row, value) of the first row that repeats a value (its smallest such
    value), None where no row does."""
    ordered = np.sort(rows, axis=1)
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if not repeated.any():
        return None
    b, j = (int(x) for x in np.argwhere(repeated)[0])
    return b, ordered[b, j].item()


def check_ids(ids: np.ndarray, rules: Rules) -> None:
    """Each id is a row of the store, and none repeats within a query: else :class:`RequestError` naming the first."""
    idn, size = rules.names[1], rules.store_size
    bad = (ids < 0) | (ids >= size)
    if bad.any():
        where = np.argwhere(bad)[0]
        raise RequestError(f"{idn}[{where[0]}, {where[1]}] = {int(ids[tuple(where)])} is outside the candidate "
                           f"store of version {rules.version} (0 .. {size - 1})")
    repeat = first_repeat(ids)  # every id is >= 0 by now
    if repeat is not None:
        b, row = repeat
        at = np.flatnonzero(ids[b] == row)[:2].tolist()
        raise RequestError(f"{idn}[{b}] repeats store row {row} (at positions {at[0]} and {at[1]}); each candidate "
                           "may appear once")


def proven_ids(ids: Sequence[np.ndarray | None], size: int) -> list[bool]:
    """Per request, True where its candidate ids (B, N) are all rows of a ``size``-row store and distinct within each
    query, proven for all requests at once (one sort per N); False where not proven (absent, odd shapes or a bad
    id): :func:`parse_request` then makes its own checks, which name the problem."""
    out = [False] * len(ids)
    groups: dict[int, list[int]] = {}
    for i, a in enumerate(ids):
        if a is not None and a.ndim == 2 and a.shape[0] > 0 and a.shape[1] > 0 and a.dtype.kind in "iu":
            groups.setdefault(a.shape[1], []).append(i)
    for members in groups.values():
        ordered = np.sort(np.concatenate([ids[i] for i in members]), axis=1)
        good = (ordered[:, 0] >= 0) & (ordered[:, -1] < size) & (ordered[:, 1:] != ordered[:, :-1]).all(axis=1)
        starts = np.cumsum([0] + [ids[i].shape[0] for i in members[:-1]])
        for i, ok in zip(members, np.logical_and.reduceat(good, starts).tolist(), strict=True):
            out[i] = ok
    return out


@functools.lru_cache(maxsize=4)
def every_row(size: int) -> np.ndarray:
    """0 .. size - 1 (read-only, made once per store size): the rows of a whole-store search."""
    rows = np.arange(size, dtype=np.int64)
    rows.flags.writeable = False
    return rows


def parse_request(query: np.ndarray | None, ids: np.ndarray | None, top_k: np.ndarray | None, rules: Rules, *,
                  wants: Iterable[str] | None = None, ids_proven: bool = False) -> Request:
    """A search request's inputs (query (B, 1) BYTES; ids (B, N) or None: the whole store; top_k (B, 1) or None) ->
    its :class:`Request`, or :class:`RequestError` naming the first problem. ``ids_proven``: :func:`proven_ids`
    found its ids good (their checks are skipped)."""
    qn, idn, _ = rules.names
    if query is None:
        raise RequestError(f"input {qn} is missing")
    if query.ndim != 2 or query.shape[1] != 1:
        raise RequestError(f"{qn} must have shape [batch, 1], got {list(query.shape)}")
    batch = query.shape[0]
    if ids is None:
        rows = np.broadcast_to(every_row(rules.store_size), (batch, rules.store_size))
    else:
        if ids.ndim != 2 or ids.shape[0] != batch:
            raise RequestError(f"{idn} must have shape [batch, candidates] with the {qn}'s batch size {batch}, got "
                               f"{list(ids.shape)}")
        if ids.shape[1] == 0:
            raise RequestError("candidate set is empty")
        if not ids_proven:
            check_ids(ids, rules)
        rows = ids
    k = None
    if top_k is not None:  # the top-k step's rule, here before any row is scored
        first = int(top_k[0, 0]) if top_k.shape == (1, 1) and batch == 1 else 0
        # One query's valid k is what check_top_k would return; anything else gets its checks (and their message).
        k = first if 1 <= first <= rows.shape[1] else check_top_k(top_k, batch, rows.shape[1])
    texts = [read_query(query[b, 0], qn if batch == 1 else f"{qn} {b} of the batch", max_bytes=rules.max_query_bytes,
                        normalize=rules.normalize, rules=rules.text_rules) for b in range(batch)]
    asked = frozenset(wants) if wants is not None else frozenset()
    return Request(texts, rows, k, asked or None)  # none named: every output


# ---- the queries' tokens and words -------------------------------------------------------------------------------
_SIMPLE = re.compile(r"[a-z0-9]+(?: [a-z0-9]+)*")  # what most queries read as: lower-case ASCII words, one space apart
_NOT_WORD = re.compile(r"[^a-z0-9]+")


class QueryText:
    """A version's query reading (text rules) and the search graph's query features (its WordPiece ids and its
    content words numbered as the store's), for a batch of queries at once.

    ``wordpiece``, ``store_words``, ``emoji_names``: what the text step loaded (``TextFeatures``; ``store_words`` None
    without a store: only :meth:`normalize` then). Equal to ``amc_contract.text``'s ``normalize_query`` and
    ``query_tokens`` and to ``store_words.query`` (tests check it), with two shortcuts
    where they give the same by construction:

    - an ASCII query under text rules 2 holds no emoji the names know (no name's key is all ASCII: checked at load),
      NFKC leaves ASCII as it is, and of ASCII only letters and digits are kept: lower case, other runs one space;
    - a query of lower-case ASCII words one space apart (most, once normalized): BERT's normalizer leaves it as it is
      and its pre-tokenizer splits it at the spaces, so its WordPiece ids are [CLS], each word's ids, [SEP], and
      its content words are its words less stopwords; each word's ids, store number and IDF are kept in a table
      (the store's words and the stopwords from load; others as queries bring them, at most ``max_words``).
      The tokenizer must be BERT's (``tokenizer.json``) and agree on sample queries at load, else every query
      goes through the tokenizer.
    """

    def __init__(self, wordpiece: Any, store_words: Any, emoji_names: dict[str, str] | None, *,
                 tokenizer_json: str | None = None, max_words: int = 100_000) -> None:
        self.wordpiece, self.store_words, self.emoji_names = wordpiece, store_words, emoji_names
        self.ascii_names = emoji_names is not None and any(key.isascii() for key in emoji_names)
        # word -> (WordPiece ids, stopword, store number or None, IDF): the store's words and the stopwords, fixed;
        # the others queries brought, at most max_words (the oldest dropped first)
        self.fixed: dict[str, tuple[tuple[int, ...], bool, int | None, float]] = {}
        self.learned: dict[str, tuple[tuple[int, ...], bool, int | None, float]] = {}
        self.max_words = max_words
        self.cls_sep: tuple[list[int], list[int]] | None = None
        if store_words is not None and tokenizer_json is not None and self._bert(tokenizer_json):
            found = wordpiece.encode("a").ids
            if len(found) > 2 and found[1:-1] == wordpiece.encode("a", add_special_tokens=False).ids:
                self.cls_sep = (found[:1], found[-1:])
                self.fixed = self._infos(sorted({*store_words.number, *amc_text.STOPWORDS}))
                if not self._agrees():
                    self.cls_sep = None

    @staticmethod
    def _bert(tokenizer_json: str) -> bool:
        spec = json.loads(tokenizer_json)
        return ((spec.get("normalizer") or {}).get("type") == "BertNormalizer"
                and (spec.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
                and (spec.get("model") or {}).get("type") == "WordPiece")

    def _agrees(self) -> bool:
        samples = ["cat face", "a", "the of and", "thumbs up medium skin tone", "x" * 120,
                   " ".join(["red heart"] * 40), "0 1 2 3 flag japan", "unknownword zzzq unknownword"]
        tokens, words, weights = self.features(samples)
        want_words, want_weights = self.store_words.query(samples)
        return (np.array_equal(tokens, amc_text.query_tokens(self.wordpiece, samples))
                and np.array_equal(words, want_words) and np.array_equal(weights, want_weights))

    def normalize(self, text: str) -> str:
        """``text`` as the version reads it: as sent under text rules 1, else ``amc_text.normalize_query``."""
        if self.emoji_names is None:
            return text
        if text.isascii() and not self.ascii_names:
            return " ".join(_NOT_WORD.sub(" ", text.lower()).split())
        return amc_text.normalize_query(text, self.emoji_names)

    def _infos(self, words: list[str]) -> dict[str, tuple[tuple[int, ...], bool, int | None, float]]:
        weights, number, stop = self.store_words.weights, self.store_words.number, amc_text.STOPWORDS
        # The batch call hands the words to the tokenizer's thread pool: worth it for a store's words, not for the
        # few new ones a batch of queries brings (on a busy machine the pool's threads wait for a core).
        encodings = (self.wordpiece.encode_batch(words, add_special_tokens=False) if len(words) > 64
                     else [self.wordpiece.encode(w, add_special_tokens=False) for w in words])
        return {w: (tuple(e.ids), w in stop, number.get(w), weights.idf(w)) for w, e in zip(words, encodings,
                                                                                              strict=True)}

    def _lookup(self, texts: Sequence[str], simple: list[bool]) -> dict[str, tuple]:
        """The entries of the ``simple`` queries' words outside the fixed table, those missing made now (one tokenizer
        call). Taken before the learned part drops its oldest entries for the new ones: a word of this batch that
        goes is still answered."""
        fixed, learned = self.fixed, self.learned
        wanted = {w for t, s in zip(texts, simple, strict=True) if s for w in t.split(" ") if w not in fixed}
        entries = {w: learned[w] for w in wanted if w in learned}
        new = self._infos(sorted(wanted - entries.keys()))
        for word, info in new.items():
            if len(learned) >= self.max_words:
                learned.pop(next(iter(learned)))
            learned[word] = info
        return {**entries, **new}

    def features(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Q,) queries, as read -> their WordPiece ids (Q, L) and content words' numbers and IDFs (Q, W), as
        ``amc_text.query_tokens`` and ``store_words.query`` give them for these queries together."""
        most = amc_text.QUERY_MAX_TOKENS
        simple = [self.cls_sep is not None and _SIMPLE.fullmatch(t) is not None for t in texts]
        entries = self._lookup(texts, simple) if any(simple) else {}
        fixed, unknown = self.fixed, self.store_words.unknown
        tokens: list[list[int] | None] = []
        numbers: list[list[int] | None] = []
        idfs: list[list[float] | None] = []
        for t, s in zip(texts, simple, strict=True):
            if not s:
                tokens.append(None), numbers.append(None), idfs.append(None)
                continue
            ids, nums, weights, seen, next_unknown = list(self.cls_sep[0]), [], [], set(), unknown
            for w in t.split(" "):
                pieces, stop, number, idf = fixed.get(w) or entries[w]
                ids.extend(pieces)
                if not stop and w not in seen:  # content words: in order, each once
                    seen.add(w)
                    if number is None:  # a word the store lacks: numbered past its last, one each
                        number, next_unknown = next_unknown, next_unknown + 1
                    nums.append(number)
                    weights.append(idf)
            ids.extend(self.cls_sep[1])
            tokens.append(ids if len(ids) <= most else ids[: most - 1] + ids[-1:])
            numbers.append(nums)
            idfs.append(weights)
        slow = [i for i, s in enumerate(simple) if not s]
        longest, counted = [1, *(len(r) for r in tokens if r is not None)], [0, *(len(r) for r in numbers if r)]
        if slow:
            slow_texts = [texts[i] for i in slow]
            slow_tokens = amc_text.wordpiece_ids(self.wordpiece, slow_texts, most)
            slow_words, slow_weights = self.store_words.query(slow_texts)
            longest.append(slow_tokens.shape[1])
            counted.append(slow_words.shape[1])  # a padded width: padding it again changes nothing
        width = amc_text.padded_width(max(longest), amc_text.QUERY_TOKEN_STEP, most)
        wide = amc_text.padded_width(max(counted), self.store_words.QUERY_WIDTH_STEP)
        pad = self.store_words.PAD
        out_tokens = np.array([[0] * width if r is None else r + [0] * (width - len(r)) for r in tokens],
                              np.int64).reshape(len(texts), width)
        out_words = np.array([[pad] * wide if r is None else r + [pad] * (wide - len(r)) for r in numbers],
                             np.int64).reshape(len(texts), wide)
        out_weights = np.array([[0.0] * wide if r is None else r + [0.0] * (wide - len(r)) for r in idfs],
                               np.float32).reshape(len(texts), wide)
        if slow:
            out_tokens[slow, : slow_tokens.shape[1]] = slow_tokens
            out_words[slow, : slow_words.shape[1]] = slow_words
            out_weights[slow, : slow_weights.shape[1]] = slow_weights
        return out_tokens, out_words, out_weights


# ---- the answers -------------------------------------------------------------------------------------------------
_LENGTH = struct.Struct("<I")


class StoreStrings:
    """The store's id and keyword strings (``store.json``) as a search answers them: UTF-8 object arrays, ids (G,) and
    keywords (G, K) ("" pads), and each row serialized as Triton serializes BYTES (per element its length as 4 bytes
    little-endian, then its bytes, in C order): a response's serialization is its rows' joined."""

    def __init__(self, ids: Sequence[str], keywords: Sequence[Sequence[str]]) -> None:
        self.ids = _objects([i.encode("utf-8") for i in ids])
        self.keywords = np.full((len(keywords), max([1, *map(len, keywords)])), b"", dtype=object)
        for g, row in enumerate(keywords):
            self.keywords[g, : len(row)] = [k.encode("utf-8") for k in row]
        self.packed_ids = _objects([serialize(self.ids[g: g + 1]) for g in range(len(self.ids))])
        self.packed_keywords = _objects([serialize(row) for row in self.keywords])


def _objects(values: list[bytes]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def serialize(array: np.ndarray) -> bytes:
    """An object array of bytes serialized as Triton's BYTES (``serialize_byte_tensor``'s result for it)."""
    return b"".join(part for value in array.reshape(-1).tolist() for part in (_LENGTH.pack(len(value)), value))


@dataclass
class Answer:
    """One request's outputs: ``arrays`` by name (those it asked for, in the step's order, C-contiguous), and for
    its BYTES outputs their serialization (``serialized``)."""

    arrays: dict[str, np.ndarray]
    serialized: dict[str, bytes]


def search(requests: Sequence[Request], graph: SearchGraph, text: QueryText, strings: StoreStrings,
           names: Sequence[str]) -> list[Answer | Exception]:
    """Each request's :class:`Answer` (or the exception its group's call raised): the requests that search as many
    rows in one group, their queries' features got at once, scored by ``graph``, cut by :func:`gather`. ``names``: the
    step's outputs in order, the graph's six (candidate_index last) then stored_ids and stored_keywords."""
    answers: list[Answer | Exception | None] = [None] * len(requests)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.rows.shape[1], []).append(i)
    for n, members in groups.items():
        group = [requests[i] for i in members]
        try:
            tokens, words, weights = text.features([t for r in group for t in r.texts])
            rows = group[0].rows if len(group) == 1 else np.concatenate([r.rows for r in group])
            wanted = [r.top_k or n for r in group]
            k = graph_k(wanted, n)
            found = gather(group, graph.score(tokens, words, weights, rows, k), wanted, k, strings, names)
        except Exception as e:  # noqa: BLE001 - the group's requests fail, the others are answered
            found = [e] * len(group)
        for i, answer in zip(members, found, strict=True):
            answers[i] = answer
    return answers  # type: ignore[return-value]


def gather(requests: Sequence[Request], merged: dict[str, np.ndarray], wanted: Sequence[int], k: int,
           strings: StoreStrings, names: Sequence[str]) -> list[Answer]:
    """A group's graph outputs for its top ``k`` (Q, k, ...) cut into each request's answer: its queries' rows, its
    ``top_k`` first columns (one contiguous copy per distinct top_k of the group), with the store strings of the rows
    kept."""
    index, ids, keywords = names[5:8]
    cuts: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    for want in sorted(set(wanted)):
        cut = {name: np.ascontiguousarray(value[:, :want]) if value.ndim > 1 and value.shape[1] == k else value
               for name, value in merged.items()}
        kept = cut[index]
        cut[ids], cut[keywords] = strings.ids[kept], strings.keywords[kept]
        cuts[want] = cut, kept
    out, start = [], 0
    for r, want in zip(requests, wanted, strict=True):
        stop = start + len(r.texts)
        cut, kept = cuts[want]
        arrays = {name: cut[name][start:stop] for name in names if r.wants is None or name in r.wants}
        serialized = {}
        if ids in arrays:
            serialized[ids] = b"".join(strings.packed_ids[kept[start:stop].reshape(-1)].tolist())
        if keywords in arrays:
            serialized[keywords] = b"".join(strings.packed_keywords[kept[start:stop].reshape(-1)].tolist())
        out.append(Answer(arrays, serialized))
        start = stop
    return out


class SerializedBytes:
    """``pb_utils.Tensor`` of a BYTES array whose serialization is known beforehand (:class:`StoreStrings`' rows).

    The stub serializes a BYTES array when the Tensor is made, by calling the ``serialize_byte_tensor`` that its module
    ``triton_python_backend_utils`` (``pb_utils``) holds at that moment (``pb_tensor.cc``). Installed once, a
    function there answers the serialization handed to it for the very array being made into a Tensor, and
    serializes any other array as before. Where the stub does not call it (another release; an array it had to
    copy first), the array is serialized by the stub as before: the same bytes, more slowly (logged once).
    """

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils
        self.missed = False

    def _pending(self) -> list:
        found = getattr(self.pb.serialize_byte_tensor, "amc_pending", None)
        if found is not None:
            return found
        original, pending = self.pb.serialize_byte_tensor, []

        def serialize_byte_tensor(input_tensor: Any) -> Any:
            if pending and pending[-1][0] is input_tensor:
                return pending.pop()[1]
            return original(input_tensor)
        serialize_byte_tensor.amc_pending = pending  # type: ignore[attr-defined]
        self.pb.serialize_byte_tensor = serialize_byte_tensor
        return pending

    def tensor(self, name: str, array: np.ndarray, serialized: bytes) -> Any:
        pending = self._pending()
        pending.append((array, serialized))
        try:
            return self.pb.Tensor(name, array)
        finally:
            if pending and pending[-1][0] is array:  # not taken: the stub serialized the array itself
                pending.pop()
                if not self.missed:
                    self.missed = True
                    self.pb.Logger.log_warn(f"BYTES output {name}: the stub serialized it itself (its Tensor did not "
                                            "call triton_python_backend_utils.serialize_byte_tensor with the array)")
