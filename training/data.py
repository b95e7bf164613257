"""Turns a :class:`~training.corpus.Corpus` into the tensors training and evaluation feed the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from amc_client.text import Tokenizer
from training.corpus import Corpus, Query
from training.model import AMC


@dataclass
class CorpusTensors:
    reduced: torch.Tensor  # (images, R, P) float32: region features after the model's fixed PCA
    keyword_tokens: torch.Tensor  # (images, K, W) int64: auto-tagger keywords as word ids
    tokenizer: Tokenizer

    def query_tokens(self, queries: list[Query]) -> torch.Tensor:
        return torch.from_numpy(self.tokenizer.encode_queries([q.text for q in queries]))  # (B, L)

    def candidates(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N) image indices, -1 pads -> reduced regions, region mask, keyword tokens."""
        valid = index >= 0
        safe = index.clamp_min(0)
        reduced = self.reduced[safe]  # (B, N, R, P)
        region_mask = valid[..., None].expand(*index.shape, reduced.shape[2])  # (B, N, R)
        keyword_tokens = self.keyword_tokens[safe] * valid[..., None, None]  # (B, N, K, W)
        return reduced, region_mask, keyword_tokens


def fit_region_pca(regions: np.ndarray, dim: int, *, seed: int = 0,
                   sample: int = 60_000) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of region vectors (images, R, D) -> mean (D,) and basis (D, dim).

    The basis is scaled so that reduced features have unit mean variance, which keeps W_v's initial
    outputs in tanh's linear range whatever the feature scale.
    """
    flat = regions.reshape(-1, regions.shape[-1])
    rng = np.random.default_rng(seed)
    rows = rng.choice(flat.shape[0], size=min(sample, flat.shape[0]), replace=False)
    x = torch.from_numpy(flat[np.sort(rows)].astype(np.float32)).double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    top = eigenvalues.flip(0)[:dim].clamp_min(1e-12)
    basis = eigenvectors.flip(1)[:, :dim] / top.mean().sqrt()
    return mean.float(), basis.float()


def corpus_tensors(corpus: Corpus, model: AMC) -> CorpusTensors:
    """Keyword ids and PCA-reduced features of every image (PCA taken from ``model``'s VAN)."""
    tokenizer = Tokenizer(corpus.vocab)
    max_k = max(1, max(len(k) for k in corpus.keywords))
    padded = np.array([k + [""] * (max_k - len(k)) for k in corpus.keywords], dtype=object)
    keyword_tokens = torch.from_numpy(tokenizer.encode_keywords(padded))
    chunks = []
    with torch.no_grad():
        for start in range(0, len(corpus.regions), 256):
            block = torch.from_numpy(corpus.regions[start:start + 256].astype(np.float32))
            chunks.append(model.van.reduce(block))
    return CorpusTensors(torch.cat(chunks), keyword_tokens, tokenizer)


def padded_candidates(queries: list[Query]) -> torch.Tensor:
    """(B, N) candidate indices of ``queries``, -1 where a query has fewer than N."""
    n = max(len(q.candidates) for q in queries)
    out = torch.full((len(queries), n), -1, dtype=torch.long)
    for b, q in enumerate(queries):
        out[b, : len(q.candidates)] = torch.from_numpy(np.asarray(q.candidates, dtype=np.int64))
    return out
