"""The search log: queries with graded relevance, candidate lists and simulated clicks."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from amc_contract.text import words  # the serving tokenizer's rules: vocabulary and queries split alike
from training.corpus.catalog import keyword_targets, split_of
from training.corpus.datatypes import SPLITS, CorpusConfig, Query

# Function words that carry no search intent. Deliberately short: "face", "hand", "man" etc. are
# content words (they distinguish emoji).
STOPWORDS = frozenset(
    {"a", "an", "the", "of", "with", "and", "or", "in", "on", "at", "to", "for", "by", "from", "as", "is"}
    | {"it", "its", "s"}
)
REL1_MIN_IDF_SHARE = 0.5  # rule (b) of name-query relevance 1, see the training.corpus docstring

# Candidate-list composition (beyond candidates_per_query in the config).
MAX_REL2_CANDIDATES = 10
MAX_REL1_CANDIDATES = 8
CLICK_PROBABILITY = {2: 0.9, 1: 0.5, 0: 0.05}
# Dwell: the probability that a click is a long one (the user stayed on the result; "satisfied"), by relevance.
# Real logs record dwell time, and engines read short clicks ("pogo-sticking" back to the results) as a negative
# signal. Without it, a click on a related image (rel 1) counts as much as one on the image the user wanted (rel 2).
DWELL = {2: 0.8, 1: 0.3, 0: 0.1}

# Bump when the build logic of the log (here or in autotag.py) changes in a way that makes old
# cache files wrong.
LOG_FORMAT = 2  # 2: dwell (satisfied clicks); no GloVe vocabulary


def content_words(text: str) -> list[str]:
    """:func:`words` without ``STOPWORDS``, in order, deduplicated."""
    return list(dict.fromkeys(w for w in words(text) if w not in STOPWORDS))


class _Index:
    """Word/keyword statistics of the corpus used by the relevance rules and hard negatives."""

    def __init__(self, names: list[str], true_keywords: list[list[str]]) -> None:
        self.n = len(names)
        self.names = names
        self.name_words = [set(content_words(t)) for t in names]
        self.keyword_words = {k: frozenset(content_words(k)) for ks in true_keywords for k in ks}
        self.image_words = [
            nw.union(*(self.keyword_words[k] for k in ks))
            for nw, ks in zip(self.name_words, true_keywords, strict=True)
        ]
        self.word_images: dict[str, list[int]] = defaultdict(list)
        for i, ws in enumerate(self.image_words):
            for w in ws:
                self.word_images[w].append(i)
        self.name_word_images: dict[str, set[int]] = defaultdict(set)
        for i, ws in enumerate(self.name_words):
            for w in ws:
                self.name_word_images[w].add(i)
        self.keyword_images: dict[str, list[int]] = defaultdict(list)
        for i, ks in enumerate(true_keywords):
            for k in ks:
                self.keyword_images[k].append(i)
        self.word_keywords: dict[str, list[str]] = defaultdict(list)
        for k, ws in self.keyword_words.items():
            for w in ws:
                self.word_keywords[w].append(k)
        self.idf = {w: math.log(self.n / len(imgs)) for w, imgs in self.word_images.items()}

    def shares_idf(self, query: set[str]) -> np.ndarray:
        """Bool (n,): images whose name + true keywords hold >= REL1_MIN_IDF_SHARE of ``query``'s IDF."""
        # Sorted: float sums must not depend on set order, which PYTHONHASHSEED varies per process.
        ordered = sorted(query)
        total = sum(self.idf.get(w, 0.0) for w in ordered)
        shared = np.zeros(self.n)
        for w in ordered:
            shared[self.word_images.get(w, [])] += self.idf.get(w, 0.0)
        return shared >= REL1_MIN_IDF_SHARE * total if total > 0 else np.zeros(self.n, dtype=bool)

    def lexical_neighbours(self, query_words: set[str]) -> np.ndarray:
        """Bool (n,): images whose name or true keywords share a content word with the query."""
        mask = np.zeros(self.n, dtype=bool)
        for w in query_words:
            mask[self.word_images.get(w, [])] = True
        return mask


def _name_query_relevant(index: _Index, target: int) -> np.ndarray:
    """Relevance (n,) of every image for the name query of image ``target`` (training.corpus docstring)."""
    rel = np.zeros(index.n, dtype=np.int64)
    query = index.name_words[target]
    # (a) images with a true keyword made only of query content words
    rule_a = np.zeros(index.n, dtype=bool)
    for k in {k for w in query for k in index.word_keywords.get(w, [])}:
        if index.keyword_words[k] and index.keyword_words[k] <= query:
            rule_a[index.keyword_images[k]] = True
    # (b) and (c): shared IDF mass of the whole name's and of its head's content words
    head = set(content_words(index.names[target].split(":", 1)[0])) or query
    rel[rule_a & index.shares_idf(query) & index.shares_idf(head)] = 1
    rel[target] = 2
    return rel


def _keyword_query_relevant(index: _Index, keyword: str) -> np.ndarray:
    rel = np.zeros(index.n, dtype=np.int64)
    kw_words = index.keyword_words[keyword] or frozenset(words(keyword))
    if kw_words:
        in_names = set.intersection(*(index.name_word_images.get(w, set()) for w in kw_words))
        rel[sorted(in_names)] = 1
    rel[index.keyword_images[keyword]] = 2
    return rel


def _pooled(regions: np.ndarray) -> np.ndarray:
    """L2-normalised mean of the 49 regions: one float32 vector per image (for visual neighbours)."""
    pooled = np.zeros((len(regions), regions.shape[-1]), dtype=np.float32)
    for s in range(0, len(regions), 512):  # chunks: a float32 copy of all regions would be ~900 MB
        pooled[s : s + 512] = regions[s : s + 512].astype(np.float32).mean(axis=1)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-6)


def _candidates(
    rel: np.ndarray,
    lexical: np.ndarray,
    visual_score: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Candidate list: relevant images, lexical and visual hard negatives, random negatives."""

    def pick(pool: np.ndarray, k: int) -> list[int]:
        k = min(k, len(pool))
        return [int(i) for i in rng.choice(pool, size=k, replace=False)] if k else []

    chosen = pick(np.flatnonzero(rel == 2), MAX_REL2_CANDIDATES)
    chosen += pick(np.flatnonzero(rel == 1), MAX_REL1_CANDIDATES)
    size = min(size, len(rel))
    room = max(size - len(chosen), 0)
    negatives = rel == 0
    # A third of the remaining slots share words with the query, a third look like the relevant
    # images: negatives a keyword matcher resp. a visual model would confuse. The rest are random.
    chosen += pick(np.flatnonzero(negatives & lexical), room // 3)
    taken = np.zeros(len(rel), dtype=bool)
    taken[chosen] = True
    order = np.argsort(-visual_score, kind="stable")
    free = negatives & ~taken
    visual = order[free[order]][: room // 3].tolist()
    chosen += visual
    taken[visual] = True
    chosen += pick(np.flatnonzero(free & ~taken), size - len(chosen))
    return np.asarray(chosen, dtype=np.int64)[rng.permutation(len(chosen))]


def build_queries(
    names: list[str],
    true_keywords: list[list[str]],
    chars: list[str],
    regions: np.ndarray,
    config: CorpusConfig,
    session: int = 0,
) -> dict[str, list[Query]]:
    """Every query once, split by target. ``session`` > 0 draws another session of the same queries: new
    candidate lists, clicks and dwell from streams of their own (session 0 is the log every figure before
    ``CorpusConfig.log_sessions`` used)."""
    index = _Index(names, true_keywords)
    # Per query: text, kind, target, relevance of every image, and its lexical neighbours (images
    # sharing a content word with the query or, for a name query, a true keyword with its emoji).
    specs: list[tuple[str, str, str, np.ndarray, np.ndarray]] = []
    for i, name in enumerate(names):
        lexical = index.lexical_neighbours(index.name_words[i])
        for k in true_keywords[i]:
            lexical[index.keyword_images[k]] = True
        specs.append((name, "name", chars[i], _name_query_relevant(index, i), lexical))
    for k in keyword_targets(true_keywords):
        lexical = index.lexical_neighbours(set(index.keyword_words[k]) or set(words(k)))
        specs.append((k, "keyword", "kw:" + k, _keyword_query_relevant(index, k), lexical))

    pooled = _pooled(regions)
    streams = [config.seed] if session == 0 else [config.seed, 1000 + session]
    rng = np.random.default_rng([*streams, 3])
    click_rng = np.random.default_rng([*streams, 4])
    click_p = np.array([CLICK_PROBABILITY[r] for r in (0, 1, 2)])
    dwell_rng = np.random.default_rng([*streams, 5])
    dwell_p = np.array([DWELL[r] for r in (0, 1, 2)])
    queries: dict[str, list[Query]] = {s: [] for s in SPLITS}
    for start in range(0, len(specs), 256):
        chunk = specs[start : start + 256]
        # Visual closeness to the query's relevant images, for a chunk of queries in one matmul.
        centroids = np.stack([pooled[rel > 0].mean(axis=0) for _, _, _, rel, _ in chunk])
        scores = centroids @ pooled.T
        for (text, kind, target, rel, lexical), score in zip(chunk, scores, strict=True):
            cands = _candidates(rel, lexical, score, config.candidates_per_query, rng)
            relevance = rel[cands]
            clicks = click_rng.random(len(cands)) < click_p[relevance]
            if not (clicks & (relevance > 0)).any():
                # Every query needs a positive to train on: click the most relevant candidate (first
                # in presentation order among ties), as a user who found what they wanted would.
                clicks[int(np.flatnonzero(relevance == relevance.max())[0])] = True
            # Its own random stream, so adding dwell left the candidate lists and clicks as they were.
            satisfied = clicks & (dwell_rng.random(len(cands)) < dwell_p[relevance])
            queries[split_of(target, config.seed, config)].append(
                Query(text, kind, target, cands, relevance, clicks, satisfied)
            )
    return queries


def relevance_of_all(names: list[str], true_keywords: list[list[str]], chars: list[str]):
    """A function query -> relevance (n,) of every image, by the same rules as the log's lists."""
    index = _Index(names, true_keywords)
    row = {c: i for i, c in enumerate(chars)}

    def relevance(query) -> np.ndarray:
        if query.kind == "name":
            return _name_query_relevant(index, row[query.target])
        return _keyword_query_relevant(index, query.text)

    return relevance
