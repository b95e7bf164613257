"""Ranking metrics and the BM25 baseline."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

NDCG_KS = (1, 5, 10, 20)


def dcg(relevance_in_rank_order: np.ndarray, k: int) -> float:
    """Sum over the top k of (2^rel - 1) / log2(rank + 1), ranks from 1."""
    rel = np.asarray(relevance_in_rank_order, dtype=np.float64)[:k]
    return float(((2.0**rel - 1.0) / np.log2(np.arange(2, rel.size + 2))).sum())


def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, k: int) -> float:
    """NDCG@k of ranking ``relevance`` by ``scores`` (descending; ties keep the given order)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ideal = dcg(np.sort(relevance)[::-1], k)
    return dcg(np.asarray(relevance)[order], k) / ideal if ideal > 0 else 0.0


def mean_ndcg(score_lists: list[np.ndarray], relevance_lists: list[np.ndarray], ks=NDCG_KS) -> dict[str, float]:
    return {f"ndcg@{k}": float(np.mean([ndcg_at_k(s, r, k) for s, r in zip(score_lists, relevance_lists)]))
            for k in ks}


class BM25:
    """Okapi BM25 over bag-of-words documents (here: an image's auto-tagger keywords)."""

    def __init__(self, documents: list[list[str]], k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.counts = [Counter(doc) for doc in documents]
        self.lengths = np.array([len(doc) for doc in documents], dtype=np.float64)
        self.avg_length = float(self.lengths.mean()) if documents else 0.0
        df = Counter(word for doc in self.counts for word in doc)
        n = len(documents)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    def score_all(self, query_words: list[str]) -> np.ndarray:
        """(documents,) scores of every document: :meth:`score` of each, from the query words' postings."""
        if not hasattr(self, "_postings"):
            postings: dict[str, tuple[list[int], list[int]]] = {}
            for d, counts in enumerate(self.counts):
                for w, tf in counts.items():
                    postings.setdefault(w, ([], []))[0].append(d)
                    postings[w][1].append(tf)
            self._postings = {w: (np.array(ds), np.array(tfs, dtype=np.float64)) for w, (ds, tfs) in postings.items()}
            self._norm = self.k1 * (1 - self.b + self.b * self.lengths / max(self.avg_length, 1e-12))
        total = np.zeros(len(self.counts))
        for w in query_words:
            if w in self._postings:
                docs, tf = self._postings[w]
                total[docs] += self.idf[w] * tf * (self.k1 + 1) / (tf + self._norm[docs])
        return total

    def score(self, query_words: list[str], doc: int) -> float:
        counts, norm = self.counts[doc], self.k1 * (1 - self.b + self.b * self.lengths[doc] / self.avg_length)
        total = 0.0
        for w in query_words:
            tf = counts.get(w, 0)
            if tf:
                total += self.idf[w] * tf * (self.k1 + 1) / (tf + norm)
        return total


def target_rank(scores: np.ndarray, target: int) -> int:
    """1-based rank of candidate ``target`` when ranking by ``scores`` (descending; ties keep the given order)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return int(np.flatnonzero(order == target)[0]) + 1


def target_metrics(score_lists: list[np.ndarray], relevance_lists: list[np.ndarray],
                   targets: list[int]) -> dict[str, float]:
    """R@1, R@10, MRR of the one target per list, and NDCG@10 of the graded relevance; means over lists."""
    ranks = np.array([target_rank(s, t) for s, t in zip(score_lists, targets, strict=True)])
    ndcg = [ndcg_at_k(s, r, 10) for s, r in zip(score_lists, relevance_lists, strict=True)]
    if not len(ranks):
        return {k: float("nan") for k in TARGET_METRICS}
    return {"r@1": float(np.mean(ranks <= 1)), "r@10": float(np.mean(ranks <= 10)),
            "mrr": float(np.mean(1.0 / ranks)), "ndcg@10": float(np.mean(ndcg))}


TARGET_METRICS = ("r@1", "r@10", "mrr", "ndcg@10")
STORE_METRICS = (*TARGET_METRICS, "target_r@1", "tag_spam_top1_rate", "hub_share")


def first_hit_rank(scores: np.ndarray, relevance: np.ndarray) -> int:
    """1-based rank of the best-ranked candidate of grade >= 1 (ties keep the given order); len + 1 if none."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.flatnonzero(np.asarray(relevance)[order] >= 1)
    return int(hits[0]) + 1 if len(hits) else len(order) + 1


def store_metrics(score_lists: list[np.ndarray], relevance_lists: list[np.ndarray], targets: list[int | None],
                  spam: list[np.ndarray]) -> dict[str, float]:
    """Whole-store search figures over queries (each ranks every image):

    * ``r@1``, ``r@10``, ``mrr``: by the first result of grade >= 1 (the target, a skin-tone variant, or another
      image the log's rules call relevant); ``ndcg@10`` of the graded relevance;
    * ``target_r@1``: the target itself first (queries with one target only);
    * ``tag_spam_top1_rate``: share of queries whose first result is a grade-0 image carrying every content word
      of the query among its auto-tags (``spam[i]``: that mask over the images, for query i);
    * ``hub_share``: of the queries whose first result is grade 0, the share taken by the single most frequent
      such image (1 wrong answer that wins everywhere: 1.0; all different: 1 / wrong queries).
    """
    if not score_lists:
        return {k: float("nan") for k in STORE_METRICS}
    ranks = np.array([first_hit_rank(s, r) for s, r in zip(score_lists, relevance_lists, strict=True)])
    tops = np.array([int(np.argmax(s)) for s in score_lists])
    wrong = np.array([r[t] == 0 for r, t in zip(relevance_lists, tops, strict=True)])
    spammed = np.array([bool(m[t]) and w for m, t, w in zip(spam, tops, wrong, strict=True)])
    with_target = [(t, top) for t, top in zip(targets, tops, strict=True) if t is not None]
    counts = np.bincount(tops[wrong]) if wrong.any() else np.zeros(1)
    return {"r@1": float(np.mean(ranks <= 1)), "r@10": float(np.mean(ranks <= 10)), "mrr": float(np.mean(1.0 / ranks)),
            "ndcg@10": float(np.mean([ndcg_at_k(s, r, 10) for s, r in zip(score_lists, relevance_lists, strict=True)])),
            "target_r@1": float(np.mean([t == top for t, top in with_target])) if with_target else float("nan"),
            "tag_spam_top1_rate": float(np.mean(spammed)),
            "hub_share": float(counts.max() / wrong.sum()) if wrong.any() else 0.0}


def reciprocal_rank_fusion(score_lists: list[np.ndarray], k: float = 60.0) -> np.ndarray:
    """RRF of several rankings of the same candidates: sum over rankers of 1 / (k + rank)."""
    fused = np.zeros(len(score_lists[0]))
    for scores in score_lists:
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        ranks = np.empty(len(order))
        ranks[order] = np.arange(1, len(order) + 1)
        fused += 1.0 / (k + ranks)
    return fused
