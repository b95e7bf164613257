"""Workloads: a gallery of candidate images (real corpus or synthetic, same shapes) and query/candidate requests.

CPU benchmarks use the real corpus (region features as float32, the auto-tagger keywords, test-query texts).
The GPU machine does not get the corpus (456 MB): it generates a synthetic gallery of the same shapes and
statistics range (non-negative post-activation features, 1-6 keywords of one or two words of the model's
collection vocabulary, i.e. its term weights' words) with a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from amc_contract import signatures as sig


@dataclass
class Gallery:
    regions: np.ndarray  # float16 (G, R, D)
    keywords: list[list[str]]  # per image
    queries: list[str]  # query texts to draw from
    source: str  # "corpus" or "synthetic"

    def __len__(self) -> int:
        return len(self.regions)


def corpus_gallery() -> Gallery:
    from training.corpus import CorpusConfig, load_corpus

    c = load_corpus(CorpusConfig(), progress=False)
    return Gallery(c.regions, c.keywords, [q.text for q in c.queries["test"]], "corpus")


def synthetic_gallery(words: list[str], size: int = 2000, seed: int = 0, queries: int = 500) -> Gallery:
    """``words``: what keywords and queries are made of (e.g. :func:`collection_words` of the checkpoint)."""
    rng = np.random.default_rng(seed)
    regions = np.abs(rng.normal(0, 1.5, size=(size, sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM))).astype(np.float16)
    pool = np.array(words, dtype=object)

    def phrase(most: int) -> str:
        return " ".join(rng.choice(pool, size=int(rng.integers(1, most + 1))))

    keywords = [list(dict.fromkeys(phrase(2) for _ in range(int(rng.integers(1, 7))))) for _ in range(size)]
    texts = [phrase(3) for _ in range(queries)]
    return Gallery(regions, keywords, texts, "synthetic")


def collection_words(checkpoint) -> list[str]:
    """The words of the candidate collection the checkpoint's term weights were counted over."""
    from amc_contract.text import TermWeights
    from amc_model.checkpoint import load_checkpoint

    return sorted(TermWeights.from_json(load_checkpoint(checkpoint).term_weights).df) or ["cat", "face"]


@dataclass
class Request:
    """One query with N candidates: ids index the gallery (and the candidate store built from it)."""

    query: str
    ids: np.ndarray  # int64 (N,)
    regions: np.ndarray = field(repr=False)  # float32 (N, R, D)
    region_mask: np.ndarray = field(repr=False)  # bool (N, R)
    keywords: np.ndarray = field(repr=False)  # object (N, K) strings, "" pads

    def __len__(self) -> int:
        return len(self.ids)


def pool_size(n: int) -> int:
    """Distinct requests kept per candidate count (bounded memory: 1000 candidates are 250 MB each)."""
    return 2 if n >= 1000 else 8 if n >= 100 else 32


def make_requests(gallery: Gallery, n: int, count: int | None = None, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed + n)
    out = []
    for _ in range(count or pool_size(n)):
        ids = rng.choice(len(gallery), size=n, replace=n > len(gallery)).astype(np.int64)
        k = max(1, max(len(gallery.keywords[j]) for j in ids))
        kw = np.full((n, k), "", dtype=object)
        for row, j in enumerate(ids):
            kw[row, :len(gallery.keywords[j])] = gallery.keywords[j]
        out.append(Request(gallery.queries[int(rng.integers(len(gallery.queries)))], ids,
                           gallery.regions[ids].astype(np.float32),
                           np.ones((n, gallery.regions.shape[1]), dtype=bool), kw))
    return out
