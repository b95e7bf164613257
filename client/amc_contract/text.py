"""Text rules shared by training and the serving text step: WordPiece ids, words, and term-weighted matches.

Training and the Triton text step (``serving/backends/text_step.py``, published with a copy of this package in each
version folder) call the same functions, so a query is tokenized and matched identically offline and online. No torch:
numpy, and the ``tokenizers`` package for WordPiece (imported only by :func:`load_wordpiece`).

Two views of text:

* **WordPiece ids** (:func:`wordpiece_ids`) feed the pretrained sentence encoder (all-MiniLM-L6-v2). Subwords
  mean no query is ever out of vocabulary.
* **Words** (:func:`words`) feed the lexical signal: how much of the query a candidate's keywords contain,
  each word weighted by its inverse document frequency over the candidate collection
  (:class:`TermWeights`, stored with the model version). This is what BM25 does well and embeddings blur:
  "face" occurs on hundreds of images and counts little, "kiwi" on two and counts a lot.

The lexical match has one definition, :func:`lexical_features` (three IDF ratios per keyword), and one way per
place it runs to find the words a query shares with keywords: :class:`LexicalMatcher` loops over a request's
keywords (the ``amc`` text step, the PyTorch reference), :class:`KeywordIndex` looks the query's words up in a fixed
collection's postings (training, a store), and the search graph matches words by number (:class:`StoreWords`;
``export.store.lexical_match``, in torch). The first two agree to the bit, the graph to float32 rounding
(``tests/unit/test_text.py``).

Queries as people type them (text rules 2, :data:`TEXT_RULES`): before either view, a query goes through
:func:`normalize_query`: every emoji becomes its CLDR English name ("🐱" -> "cat face", "🇯🇵" -> "flag japan"),
then case, underscores and stray punctuation stop mattering ("thumbs_up" = "Thumbs up!" = "thumbs up"). The
emoji -> name table (:class:`EmojiNames`) is built from CLDR at training and publish time
(``training.corpus.catalog.emoji_names``) and shipped with each published version (``emoji_names.json``), so
training and serving read the same names. Keywords are not normalized (they are the catalog's own strings).
Versions published before rules 2 (rules 1: no ``text_rules`` in their ``version.json``) keep their queries as
sent: the text step applies the rules its version declares.

Why one module: it is the text rules a version declares as one (``text_rules``), and the lexical match's three ways
(:class:`LexicalMatcher`, :class:`KeywordIndex`, :class:`StoreWords`) and the query reading they start from must
agree to the bit, so they are read against each other here.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")

# The version of the query rules below. 1 (implicit: checkpoints and published versions that name none): the query
# is used as sent. 2: :func:`normalize_query` first. A model is trained with one version and served with the same
# (``Checkpoint.text_rules``, ``text_rules`` in a published text step's ``version.json``).
TEXT_RULES = 2
EMOJI_NAMES_FILE = "emoji_names.json"  # beside a published text step: the EmojiNames it normalizes queries with

# Token budgets of the sentence encoder, [CLS] and [SEP] included; longer texts are truncated, not rejected.
QUERY_MAX_TOKENS = 48
KEYWORD_MAX_TOKENS = 16

# Function words that carry no search intent and never count as a lexical match. Deliberately short: "face",
# "hand", "man" are content words (they distinguish images); IDF weighs those.
STOPWORDS = frozenset(
    {"a", "an", "the", "of", "with", "and", "or", "in", "on", "at", "to", "for", "by", "from", "as", "is"}
    | {"it", "its", "s"}
)

# Per keyword of a candidate, the lexical features LAN reads (the last axis of ``keyword_lexical``):
LEXICAL_FEATURES = ("keyword_in_query", "query_in_keyword", "query_in_candidate")
# keyword_in_query:   IDF share of the keyword's words that occur in the query (1.0: an exact tag match)
# query_in_keyword:   IDF share of the query's words that occur in this keyword
# query_in_candidate: IDF share of the query's words that occur in any keyword of the candidate (BM25's view)


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text`` after NFKC normalisation ("Man’s hat" -> man, s, hat)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def content_words(text: str) -> list[str]:
    """:func:`words` without ``STOPWORDS``, in order, deduplicated."""
    return list(dict.fromkeys(w for w in words(text) if w not in STOPWORDS))


_PRESENTATION = {0xFE0E: None, 0xFE0F: None}  # variation selectors: text / emoji presentation of the same character
# Kept by normalize_query besides letters, digits and marks: other symbols (So: emoji and pictographs no table names),
# and what joins an emoji sequence: ZWNJ/ZWJ, skin-tone modifiers, tag characters (subdivision flags).
_EMOJI_PARTS = frozenset([0x200C, 0x200D, *range(0x1F3FB, 0x1F400), *range(0xE0020, 0xE0080)])


class EmojiNames(dict):
    """Emoji (a character or a sequence: ZWJ, skin tone, keycap, flag) -> its CLDR English name ("tts").

    Keys are held without U+FE0F, so that an emoji matches with or without its presentation selector. Built
    from CLDR by ``training.corpus.catalog.emoji_names``; :meth:`to_json` / :meth:`from_json` ship it with a
    published version (``emoji_names.json``).
    """

    def __init__(self, names: dict[str, str] | None = None) -> None:
        super().__init__()
        for key, name in (names or {}).items():
            key = key.translate(_PRESENTATION)
            if key and name:
                self.setdefault(key, name)
        # first character -> the lengths of the keys starting with it, longest first (longest match wins)
        lengths: dict[str, set[int]] = {}
        for key in self:
            lengths.setdefault(key[0], set()).add(len(key))
        self.lengths = {c: tuple(sorted(ls, reverse=True)) for c, ls in lengths.items()}

    def replace(self, text: str) -> str:
        """``text`` (variation selectors already dropped) with every named emoji replaced by " name ", scanning
        left to right and taking the longest key at each position (a ZWJ sequence before its first emoji)."""
        if not self.lengths or not any(c in self.lengths for c in text):
            return text
        out, i, n = [], 0, len(text)
        while i < n:
            for length in self.lengths.get(text[i], ()):
                name = self.get(text[i:i + length]) if i + length <= n else None
                if name is not None:
                    out.append(f" {name} ")
                    i += length
                    break
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    def to_json(self) -> str:
        return json.dumps({"text_rules": TEXT_RULES, "names": dict(sorted(self.items()))}, ensure_ascii=False,
                          indent=0)

    @classmethod
    def from_json(cls, text: str) -> EmojiNames:
        data = json.loads(text)
        return cls(data["names"] if isinstance(data, dict) and "names" in data else data)


def load_emoji_names(text: str) -> EmojiNames:
    """The :class:`EmojiNames` of an ``emoji_names.json`` text."""
    return EmojiNames.from_json(text)


def dump_emoji_names(names: dict[str, str]) -> str:
    """``names`` as the text of an ``emoji_names.json``."""
    return (names if isinstance(names, EmojiNames) else EmojiNames(names)).to_json()


def _kept(c: str) -> bool:
    category = unicodedata.category(c)
    # Plane 1's emoji and pictograph blocks are kept whatever their category: an emoji newer than this Python's
    # Unicode data is unassigned (Cn) here, and must stay as text rather than leave the query empty.
    return category[0] in "LNM" or category == "So" or ord(c) in _EMOJI_PARTS or 0x1F000 <= ord(c) < 0x20000


def normalize_query(text: str, emoji_names: dict[str, str]) -> str:
    """A query as the model reads it (text rules 2), in three steps:

    1. every emoji ``emoji_names`` names is replaced by its name, surrounded by spaces: the longest match first, so
       ZWJ sequences, skin-tone sequences, keycaps and flags map to their own name ("👍🏽" -> "thumbs up: medium
       skin tone", "🇯🇵" -> "flag: Japan"); variation selectors (U+FE0E, U+FE0F) are dropped first, so an emoji
       matches with and without them. An emoji the table does not name stays as it is.
    2. NFKC, then lower case (after step 1: NFKC would turn "™" into "TM" before it could be named).
    3. every run of characters other than letters, digits and marks becomes one space, and the ends are
       stripped: punctuation, underscores, math and currency signs go; other symbols (So: the emoji no table
       names, and anything in plane 1's emoji blocks, U+1F000-U+1FFFF) and the joiners and modifiers of emoji
       sequences stay. So "thumbs_up" = "Thumbs up!" =
       "thumbs up", and "🐱" = "cat face".

    Returns "" where nothing is left (a query of punctuation and spaces only): the caller refuses it.
    """
    names = emoji_names if isinstance(emoji_names, EmojiNames) else EmojiNames(emoji_names)
    text = names.replace(text.translate(_PRESENTATION))
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join("".join(c if _kept(c) else " " for c in text).split())


def load_wordpiece(definition: str):
    """A ``tokenizers.Tokenizer`` from the text of a ``tokenizer.json`` (padding and truncation are ours)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(definition)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def wordpiece_ids(tokenizer, texts: Sequence[str], max_tokens: int) -> np.ndarray:
    """(n,) texts -> (n, L) int64 WordPiece ids with [CLS] ... [SEP], 0 pads, at most ``max_tokens`` each.

    A longer text keeps its first ``max_tokens - 1`` tokens and its [SEP].
    """
    rows = []
    for encoding in tokenizer.encode_batch(list(texts)):
        ids = encoding.ids
        rows.append(ids if len(ids) <= max_tokens else ids[: max_tokens - 1] + ids[-1:])
    out = np.zeros((len(rows), max([1, *map(len, rows)])), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


class TermWeights:
    """Inverse document frequencies of words over a candidate collection (an image's keywords = a document).

    BM25's IDF, ``log(1 + (n - df + 0.5) / (df + 0.5))``; a word the collection never saw gets the IDF of
    df = 0 (it matches nothing, but still counts in the query's total, so a query of unknown words scores no
    lexical match anywhere).
    """

    def __init__(self, document_frequency: dict[str, int], documents: int) -> None:
        self.df = dict(document_frequency)
        self.n = int(documents)
        self.unseen = self._idf(0)

    def _idf(self, df: int) -> float:
        return math.log(1.0 + (self.n - df + 0.5) / (df + 0.5))

    def idf(self, word: str) -> float:
        df = self.df.get(word)
        return self.unseen if df is None else self._idf(df)

    @classmethod
    def from_documents(cls, documents: Iterable[Iterable[str]]) -> TermWeights:
        """``documents``: per candidate image, its keyword strings."""
        df: Counter[str] = Counter()
        n = 0
        for keywords in documents:
            n += 1
            df.update({w for k in keywords for w in content_words(k)})
        return cls(dict(df), n)

    def to_json(self) -> str:
        return json.dumps({"documents": self.n, "document_frequency": dict(sorted(self.df.items()))})

    @classmethod
    def from_json(cls, text: str) -> TermWeights:
        data = json.loads(text)
        return cls(data["document_frequency"], data["documents"])


def padded_keywords(keywords: Iterable[Sequence[str]]) -> np.ndarray:
    """Per-image keyword lists -> (images, K) object array, "" pads (K at least 1): the layout the lexical match
    below reads (:class:`LexicalMatcher`, :class:`KeywordIndex`, :class:`StoreWords`)."""
    rows = [list(kw) for kw in keywords]
    out = np.full((len(rows), max([1, *map(len, rows)])), "", dtype=object)
    for i, kw in enumerate(rows):
        out[i, : len(kw)] = kw
    return out


def lexical_features(matched: np.ndarray, mass: np.ndarray, real: np.ndarray, covered: np.ndarray,
                     total: float) -> np.ndarray:
    """The lexical features (:data:`LEXICAL_FEATURES`) of N candidates from what one query shares with their keywords:
    the one definition the engines below end in (``export.store.lexical_match`` restates it in torch, inside the
    search graph; ``tests/unit/test_text.py`` holds them equal).

    ``matched`` (N, K): IDF mass of the query's words each keyword has; ``mass`` (N, K): the keyword's own IDF mass;
    ``real`` (N, K): a keyword, not padding; ``covered`` (N,): IDF mass of the query's words that any keyword of the
    candidate has; ``total``: the query's IDF mass -> (N, K, 3) float32: 0 on padding and on keywords that match
    nothing, and everywhere for a query without content words.
    """
    out = np.zeros((*matched.shape, len(LEXICAL_FEATURES)), dtype=np.float32)
    if total <= 0:
        return out
    # Written where they are not 0 only: a whole-store search has a few matches among tens of thousands of keywords.
    slots = np.flatnonzero(matched > 0)
    found = matched.reshape(-1)[slots]
    flat = out.reshape(-1, len(LEXICAL_FEATURES))
    flat[slots, 0] = found / mass.reshape(-1)[slots]  # keyword_in_query
    flat[slots, 1] = found / total  # query_in_keyword
    hit = np.flatnonzero(covered > 0)
    out[hit, :, 2] = np.where(real[hit], covered[hit, None] / total, 0.0)  # query_in_candidate
    return out


class LexicalMatcher:
    """The ``keyword_lexical`` features of candidates for one query (see :data:`LEXICAL_FEATURES`): keywords sent with
    a request, matched by a loop over them. :class:`KeywordIndex` does the same for a fixed collection from an index.

    Keeps each keyword's weighted words, so that candidate sets that repeat tags cost one lookup per tag. Every sum
    of IDFs runs in the query's word order, as :class:`KeywordIndex`'s do, so the two agree to the bit.
    """

    def __init__(self, weights: TermWeights) -> None:
        self.weights = weights
        self._keyword_cache: dict[str, dict[str, float]] = {}

    def query_weights(self, query: str) -> dict[str, float]:
        """The query's content words and their IDFs, in order."""
        return {w: self.weights.idf(w) for w in content_words(query)}

    def _weighted(self, text: str) -> dict[str, float]:
        found = self._keyword_cache.get(text)
        if found is None:
            found = {w: self.weights.idf(w) for w in content_words(text)}
            if len(self._keyword_cache) < 200_000:  # bounded: a server sees unbounded distinct keywords
                self._keyword_cache[text] = found
        return found

    def features(self, query: str, keywords: np.ndarray) -> np.ndarray:
        """``keywords`` (N, K) strings, '' pads -> (N, K, 3) float32; padding and word-less keywords get 0."""
        keywords = np.asarray(keywords, dtype=object)
        q = self.query_weights(query)
        total = sum(q.values())
        if total <= 0:
            return np.zeros((*keywords.shape, len(LEXICAL_FEATURES)), dtype=np.float32)
        matched, mass = np.zeros(keywords.shape), np.zeros(keywords.shape)
        covered = np.zeros(len(keywords))
        words = q.keys()
        for c, row in enumerate(keywords.tolist()):
            seen: set[str] = set()
            for k, text in enumerate(row):
                kw = self._weighted(text) if text else {}
                if not words.isdisjoint(kw):
                    seen.update(kw)
                    matched[c, k] = sum(idf for w, idf in q.items() if w in kw)
                    mass[c, k] = sum(kw.values())
            if seen:
                covered[c] = sum(idf for w, idf in q.items() if w in seen)
        return lexical_features(matched, mass, keywords != "", covered, total)


class KeywordIndex:
    """A fixed collection's keywords (a candidate store's, a training corpus's) indexed by word: the features of
    :meth:`LexicalMatcher.features` over many of its rows at once.

    ``features(query, rows)`` equals ``matcher.features(query, keywords[rows])`` to the bit, but costs a pass over the
    postings of the query's words plus numpy gathers, instead of a Python loop over every keyword of every candidate:
    whole-store search and training against the collection score every stored image for each query.
    """

    def __init__(self, matcher: LexicalMatcher, keywords: np.ndarray) -> None:
        keywords = np.asarray(keywords, dtype=object)  # (G, K), "" pads
        self.matcher = matcher
        self.keywords = keywords
        distinct, inverse = np.unique(keywords.reshape(-1), return_inverse=True)
        self.distinct = len(distinct)
        self.index = inverse.reshape(keywords.shape)  # (G, K) -> distinct keyword
        self.real = keywords != ""  # (G, K)
        weighted = [matcher._weighted(text) if text else {} for text in distinct.tolist()]
        self.mass = np.array([sum(kw.values()) for kw in weighted], dtype=np.float64)[self.index]  # (G, K)
        keyword_postings: dict[str, list[int]] = {}  # word -> the distinct keywords that have it
        for u, kw in enumerate(weighted):
            for w in kw:
                keyword_postings.setdefault(w, []).append(u)
        row_postings: dict[str, list[int]] = {}  # word -> the rows any of whose keywords has it, each row once
        for g, row in enumerate(self.index.tolist()):
            for w in {w for u in row for w in weighted[u]}:
                row_postings.setdefault(w, []).append(g)
        self.postings = {w: (np.array(us, dtype=np.int64), np.array(row_postings[w], dtype=np.int64))
                         for w, us in keyword_postings.items()}

    def features(self, query: str, rows: np.ndarray | None = None) -> np.ndarray:
        """(N,) rows of the collection (None: all of them) -> (N, K, 3) float32, as ``LexicalMatcher.features``."""
        index = self.index if rows is None else self.index[rows]  # (N, K)
        q = self.matcher.query_weights(query)
        total = sum(q.values())
        if total <= 0:
            return np.zeros((*index.shape, len(LEXICAL_FEATURES)), dtype=np.float32)
        matched = np.zeros(self.distinct)  # per distinct keyword
        covered = np.zeros(len(self.index))  # per row
        for w, idf in q.items():
            found = self.postings.get(w)
            if found is not None:  # each keyword and each row is in a word's postings once
                matched[found[0]] += idf
                covered[found[1]] += idf
        if rows is None:
            return lexical_features(matched[index], self.mass, self.real, covered, total)
        return lexical_features(matched[index], self.mass[rows], self.real[rows], covered[rows], total)


def padded_width(n: int, step: int, most: int | None = None) -> int:
    """``n`` rounded up to a multiple of ``step`` (at least ``step``; at most ``most`` where given): the width a
    row of ``n`` items is padded to, so that requests of similar length have equal shapes and Triton's dynamic
    batcher, which merges only requests of equal shapes, can batch them."""
    width = max(step, -(-n // step) * step)
    return width if most is None else min(width, most)


QUERY_TOKEN_STEP = 16  # a query's WordPiece ids are padded to a multiple of this, at most QUERY_MAX_TOKENS


def query_tokens(tokenizer, queries: Sequence[str]) -> np.ndarray:
    """(B,) queries -> (B, L) int64 WordPiece ids as :func:`wordpiece_ids` gives them (``QUERY_MAX_TOKENS``), 0
    padded to L = :func:`padded_width` of the longest: what the search graph's encoder reads. The encoder
    gives padding no attention, so the width changes no embedding."""
    ids = wordpiece_ids(tokenizer, queries, QUERY_MAX_TOKENS)
    width = padded_width(ids.shape[1], QUERY_TOKEN_STEP, QUERY_MAX_TOKENS)
    return np.pad(ids, ((0, 0), (0, width - ids.shape[1])))


class StoreWords:
    """A candidate store's keyword words, numbered, for the lexical features computed inside the search graph.

    The search graph (``export/store.py``) holds, per stored keyword, the numbers of its content words
    (:meth:`keyword_words`) and their IDF mass; the search step feeds it, per query, the numbers of the query's
    content words and their IDFs (:meth:`query`). The graph's match of the two gives
    :meth:`LexicalMatcher.features` without a loop over candidates. Words are numbered in sorted order of the
    store's distinct content words, so the search step (from ``store.json``) and the export (from the store) number
    them alike. A query word the store lacks gets a number from :attr:`unknown` (one past the last word) up, one
    each, so that a query's numbers stay distinct (the graph would count a repeated one once): it matches nothing
    but still counts in the query's IDF total, as in :meth:`LexicalMatcher.features`.
    """

    PAD = -1  # word slots past a keyword's or a query's words; a query's pads weigh 0
    QUERY_WIDTH_STEP = 8  # query word slots are padded to a multiple of this (see padded_width)

    def __init__(self, weights: TermWeights, keywords: Iterable[str]) -> None:
        self.weights = weights
        vocabulary = sorted({w for k in set(keywords) if k for w in content_words(k)})
        self.number = {w: i for i, w in enumerate(vocabulary)}
        self.unknown = len(vocabulary)

    def keyword_words(self, keywords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(G, K) keyword strings ("" pads) -> their word numbers (G, K, W) int64 (:attr:`PAD` after a keyword's
        words; W the most words of any keyword, at least 1) and their IDF mass (G, K) float32 (0 on padding)."""
        keywords = np.asarray(keywords, dtype=object)
        distinct, inverse = np.unique(keywords.reshape(-1), return_inverse=True)
        per = [content_words(k) if k else [] for k in distinct.tolist()]
        width = max([1, *map(len, per)])
        numbers = np.full((len(distinct), width), self.PAD, dtype=np.int64)
        mass = np.zeros(len(distinct), dtype=np.float64)
        for u, ws in enumerate(per):
            missing = [w for w in ws if w not in self.number]
            if missing:  # numbered from other keywords: a query word could match it in one place and not the other
                raise ValueError(f"keyword {distinct[u]!r} has words this store's numbering lacks: {missing}")
            numbers[u, : len(ws)] = [self.number[w] for w in ws]
            mass[u] = sum(self.weights.idf(w) for w in ws)
        inverse = inverse.reshape(keywords.shape)
        return numbers[inverse], mass[inverse].astype(np.float32)

    @classmethod
    def row_words(cls, numbers: np.ndarray) -> np.ndarray:
        """(G, K, W) keyword word numbers (:meth:`keyword_words`) -> (G, Wc) int64: each row's distinct words over
        all its keywords, ascending, :attr:`PAD` after them (Wc the most of any row, at least 1)."""
        flat = np.sort(numbers.reshape(len(numbers), -1), axis=1)  # PAD (-1) first
        flat[:, 1:][flat[:, 1:] == flat[:, :-1]] = cls.PAD  # a word's repeats become padding
        flat = np.take_along_axis(flat, np.argsort(flat == cls.PAD, axis=1, kind="stable"), axis=1)  # words first
        return flat[:, : max(1, int((flat != cls.PAD).sum(1).max(initial=0)))]

    def query(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B,) queries -> their content words' numbers (B, W) int64 and IDFs (B, W) float32, :attr:`PAD` and 0
        after each query's words; W is the most words of any of them, padded by :func:`padded_width`."""
        per = [content_words(q) for q in queries]
        width = padded_width(max([0, *map(len, per)]), self.QUERY_WIDTH_STEP)
        numbers = np.full((len(per), width), self.PAD, dtype=np.int64)
        idf = np.zeros((len(per), width), dtype=np.float32)
        for b, ws in enumerate(per):
            unknown = iter(range(self.unknown, self.unknown + len(ws)))  # words the store lacks: past the last
            numbers[b, : len(ws)] = [self.number[w] if w in self.number else next(unknown) for w in ws]
            idf[b, : len(ws)] = [self.weights.idf(w) for w in ws]
        return numbers, idf
