"""Batches from the click log: which (query, clicked image, unclicked images) a training step sees.

:func:`training_pairs` keeps the queries that have both a positive and a negative candidate; each step draws,
per query of its batch, one clicked image and ``negatives`` unclicked ones, either one query at a time
(:func:`batch_indices`, ``TrainConfig.sampling="sequential"``, the original stream) or for the whole batch at
once (:class:`BatchSampler`, ``"vectorized"``). Column 0 of a batch's index is the clicked image.
"""

from __future__ import annotations

import numpy as np
import torch

from training.corpus import Query


def training_pairs(queries: list[Query], dwell: bool) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(query index, positive candidates, negative candidates) for queries with at least one of each.

    Positives are the clicked candidates; with ``dwell``, the long-dwell (satisfied) clicks where a query has
    any, and its short clicks join the unclicked candidates as negatives (corpus.searchlog.DWELL says why).
    """
    pairs = []
    for i, q in enumerate(queries):
        clicks = np.asarray(q.clicks, dtype=bool)
        positive = np.asarray(q.satisfied, dtype=bool) if dwell and q.satisfied.any() else clicks
        negative = ~positive if dwell and q.satisfied.any() else ~clicks
        cands = np.asarray(q.candidates)
        if positive.any() and negative.any():
            pairs.append((i, cands[positive], cands[negative]))
    return pairs


def batch_indices(pairs, rng: np.random.Generator, negatives: int) -> tuple[list[int], torch.Tensor]:
    rows, qids = [], []
    for qid, clicked, unclicked in pairs:
        positive = rng.choice(clicked)
        negs = rng.choice(unclicked, size=negatives, replace=unclicked.size < negatives)
        rows.append(np.concatenate([[positive], negs]))
        qids.append(qid)
    return qids, torch.from_numpy(np.stack(rows).astype(np.int64))


class BatchSampler:
    """``sampling="vectorized"``: a batch's clicked candidate (uniform among the positives) and ``negatives``
    distinct unclicked ones (uniform; with replacement where a query has fewer) from padded tables, in a
    few numpy calls for the whole batch."""

    def __init__(self, pairs, negatives: int) -> None:
        self.qids = np.array([q for q, _, _ in pairs], dtype=np.int64)
        self.n_pos = np.array([len(c) for _, c, _ in pairs])
        self.n_neg = np.array([len(u) for _, _, u in pairs])
        self.pos = np.zeros((len(pairs), self.n_pos.max()), dtype=np.int64)
        self.neg = np.zeros((len(pairs), self.n_neg.max()), dtype=np.int64)
        for i, (_, clicked, unclicked) in enumerate(pairs):
            self.pos[i, :len(clicked)] = clicked
            self.neg[i, :len(unclicked)] = unclicked
        self.negatives = negatives

    def __call__(self, chosen: np.ndarray, rng: np.random.Generator) -> tuple[list[int], torch.Tensor]:
        n_pos, n_neg = self.n_pos[chosen], self.n_neg[chosen]
        positive = self.pos[chosen, (rng.random(len(chosen)) * n_pos).astype(np.int64)]  # (B,)
        keys = rng.random((len(chosen), self.neg.shape[1]))  # a random order of each query's unclicked
        keys[np.arange(self.neg.shape[1])[None, :] >= n_neg[:, None]] = 2.0  # padding sorts last
        slot = np.argsort(keys, axis=1)[:, :self.negatives]  # (B, t)
        short = n_neg < self.negatives
        if short.any():
            slot[short] = (rng.random((int(short.sum()), self.negatives)) * n_neg[short, None]).astype(np.int64)
        negs = np.take_along_axis(self.neg[chosen], slot, axis=1)  # (B, t)
        return self.qids[chosen].tolist(), torch.from_numpy(np.concatenate([positive[:, None], negs], axis=1))
