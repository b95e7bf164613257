"""Negatives from the whole collection, for training that matches whole-store search (issue 21).

The logged lists' ranking loss sees 30 candidates per query, so the model never learns to push down the thousands of
images a whole-store search must pass: wrong images whose auto-tags hold the query's words (tag spam) and images that
come first for many unrelated queries (hubs). :class:`CollectionNegatives` draws, per training step, negatives from
the whole collection, which ``training.step.collection_loss`` scores with the full model (MTN included) in a softmax
against the clicked image:

* the batch's clicked images (in-batch negatives) and ``collection_random`` images drawn at random from the collection;
* ``collection_hard`` hard negatives per query, from its pool: images whose auto-tags carry the most of the query's
  content words (:meth:`_tag_pool`), the clicked image's visual near neighbours (:func:`visual_neighbours`), and what
  the current model ranks first over the whole collection (:meth:`mine`, every ``mine_every`` epochs, for
  ``mine_queries`` queries at a time: hubs included).

All of them are scored against every query of the batch (:func:`training.retrieval.score_shared` computes each
image's projections once), so a query also meets the hard negatives of its neighbours in the batch.

No relevant image is a negative: a training query's graded relevance over the whole collection comes from the
log's own rules (:func:`training.protocols.store_relevance`: the judgments the simulated clicks are drawn from, which
read the clean CLDR keywords of every image, with skin-tone variants of a name query's target), and an image of
grade >= 1 for any training query of the same text is never drawn or is masked out of the softmax. Test and
validation targets are never training queries' targets (the split is by target), but a few test texts are also
training texts of another target (a name that is also a keyword): those texts are trained against the whole
collection like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.corpus import Corpus, Query
from training.data import CorpusTensors
from training.protocols import store_relevance
from training.retrieval import CollectionScorer

VISUAL_NEIGHBOURS = 16  # per image, its nearest images by mean region feature (cosine)
TAG_POOL = 32  # per query, at most this many tag-spam candidates (the most covering first)
MINED = 16  # per query, the model's best-ranked irrelevant images kept at each mining


@dataclass
class CollectionSample:
    shared: np.ndarray  # (P,) images every query of the batch is scored against
    excluded: np.ndarray  # (B, P) bool: shared images that are no negative of the query (relevant to it)
    positive_slot: np.ndarray  # (B,) where each query's clicked image is in ``shared``


class CollectionNegatives:
    """Per training query (by its row in the split), its relevant images and its hard-negative pool."""

    def __init__(self, corpus: Corpus, data: CorpusTensors, queries: list[Query], *, seed: int) -> None:
        self.data = data
        self.texts = data.normalized([q.text for q in queries])
        distinct = {t: i for i, t in enumerate(dict.fromkeys(self.texts))}
        self.row = np.array([distinct[t] for t in self.texts])  # query -> its distinct text
        self.distinct = list(distinct)
        # Per distinct text, every image relevant to any query of that text (a CLDR name is often a keyword query's
        # text too, with other relevant images), by the whole-store protocol's rules (skin-tone variants included).
        relevance = store_relevance(corpus)
        self.relevant = np.zeros((len(distinct), len(corpus.chars)), dtype=bool)  # (T, G)
        seen: set[tuple[str, str]] = set()
        for q, t in zip(queries, self.texts, strict=True):
            if (q.kind, q.target) not in seen:
                seen.add((q.kind, q.target))
                self.relevant[distinct[t]] |= relevance(q) >= 1
        self.images = self.relevant.shape[1]
        self.tag = [self._tag_pool(t, r) for t, r in zip(self.distinct, self.relevant, strict=True)]
        self.mined: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(self.distinct)
        self.neighbours = visual_neighbours(data.reduced)
        self.rng = np.random.default_rng([seed, 21])

    def _tag_pool(self, text: str, relevant: np.ndarray) -> np.ndarray:
        """Irrelevant images whose auto-tags cover the most of the query's words (all of them first)."""
        covered = self.data.index.features(text)[..., 2].max(1)  # (G,): IDF share of the query's words the image's tags carry
        candidates = np.flatnonzero((covered > 0) & ~relevant)
        order = np.argsort(-covered[candidates], kind="stable")[:TAG_POOL]
        return candidates[order]

    def mine(self, model, queries: int | None = None, batch: int = 16) -> None:
        """Keep, per distinct training query (``queries`` of them drawn at random, None: all), the irrelevant images
        the current model ranks highest in the whole collection; the others keep what an earlier mining found."""
        scorer = CollectionScorer(model, self.data, batch=batch)
        chosen = np.arange(len(self.distinct))
        if queries is not None and queries < len(chosen):
            chosen = np.sort(self.rng.choice(chosen, size=queries, replace=False))
        for start in range(0, len(chosen), 256):
            rows = chosen[start:start + 256]
            scores = scorer.scores([self.distinct[r] for r in rows])  # (b, G)
            scores[self.relevant[rows]] = -np.inf
            k = min(MINED, scores.shape[1] - 1)
            top = np.argpartition(-scores, k, axis=1)[:, :k]
            for r, found in zip(rows, top.astype(np.int64), strict=True):
                self.mined[r] = found
        model.train()

    def sample(self, qids: np.ndarray, positives: np.ndarray, hard: int, random: int) -> CollectionSample:
        """The step's negatives for queries ``qids`` (rows of the split) with clicked images ``positives``: the
        batch's clicked images, ``random`` random images and ``hard`` of each query's hard negatives, all shared by
        every query of the batch (a query's hard negatives are often hard for its neighbours in the batch too)."""
        rows = self.row[qids]
        drawn = [positives, self.rng.choice(self.images, size=min(random, self.images), replace=False)]
        for r, p in zip(rows, positives, strict=True):
            pool = np.concatenate([self.tag[r], self.mined[r], self.neighbours[p]])
            pool = pool[~self.relevant[r, pool]]
            if len(pool):
                drawn.append(self.rng.choice(pool, size=min(hard, len(pool)), replace=False))
        shared, inverse = np.unique(np.concatenate(drawn), return_inverse=True)
        positive_slot = inverse[: len(positives)]
        excluded = self.relevant[rows][:, shared]  # (B, P)
        excluded[np.arange(len(rows)), positive_slot] = False  # the target of each query's softmax
        return CollectionSample(shared, excluded, positive_slot)

    def texts_of(self, qids: np.ndarray) -> list[str]:
        return [self.texts[i] for i in qids]


def visual_neighbours(reduced: torch.Tensor, k: int = VISUAL_NEIGHBOURS) -> np.ndarray:
    """(G, R, P) reduced region features -> (G, k) each image's nearest other images by its mean region vector."""
    pooled = torch.nn.functional.normalize(reduced.mean(1, dtype=torch.float32), dim=-1)  # (G, P)
    out = []
    with torch.no_grad():
        for start in range(0, len(pooled), 1024):
            sim = pooled[start:start + 1024] @ pooled.T  # (b, G)
            sim[torch.arange(len(sim)), torch.arange(start, start + len(sim))] = -2.0  # not itself
            out.append(sim.topk(min(k, len(pooled) - 1), dim=1).indices)
    return torch.cat(out).cpu().numpy().astype(np.int64)
