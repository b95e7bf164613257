"""Turns a :class:`~training.corpus.Corpus` into the tensors training and evaluation feed the model.

Text goes through the frozen sentence encoder once: every query text and every keyword string is embedded
by :class:`amc_model.text_encoder.TextEmbeddings` and cached on disk (keyed by the encoder package's version, so a
new encoder never reuses old vectors). Every lexical feature of a (query, image) pair that training and evaluation
use comes from :meth:`CorpusTensors.lexical`: the corpus's keywords indexed once (:class:`amc_contract.text.KeywordIndex`,
equal to the bit to the :class:`~amc_contract.text.LexicalMatcher` the serving text step runs), per batch, for
training's logged pairs once before the first step (:class:`LoggedPairs`, ``TrainConfig.precompute_lexical``), and
against the whole collection (``training.collection``, ``training.retrieval``).

Queries enter through :meth:`CorpusTensors.query_text` and :meth:`CorpusTensors.lexical` (and :class:`LoggedPairs`,
which uses both), where they are read as the served text step reads them: :func:`amc_contract.text.normalize_query`
with CLDR's emoji names (text rules ``TEXT_RULES``; ``training.corpus.catalog.emoji_names``). Keywords are used as
they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch

from amc_contract.text import (
    LEXICAL_FEATURES,
    EmojiNames,
    KeywordIndex,
    LexicalMatcher,
    TermWeights,
    normalize_query,
    padded_keywords,
)
from amc_model.model import AMC, TEXT_DIM
from amc_model.text_encoder import TextEmbeddings
from training.corpus import Corpus


@dataclass
class CorpusTensors:
    reduced: torch.Tensor  # (images, R, P) float32: region features after the model's fixed PCA
    keyword_embeddings: torch.Tensor  # (images, K, E) float32: auto-tagger keywords' embeddings, zero pads
    keywords: np.ndarray  # (images, K) object: the keyword strings, '' pads
    matcher: LexicalMatcher
    text: TextEmbeddings
    # The emoji names queries are normalized with; None (the default): CLDR's, loaded on first use
    # (training.corpus.catalog.emoji_names). An instance may set its own.
    emoji_names: ClassVar[EmojiNames | None] = None

    def normalized(self, texts: list[str]) -> list[str]:
        """Query texts as the model reads them (``amc_contract.text.normalize_query``, text rules 2), each computed
        once per instance. A query that normalizes to "" stays "" here (the served step refuses it)."""
        cache = self.__dict__.setdefault("_normalized", {})
        names = self.emoji_names
        if names is None:
            from training.corpus.catalog import emoji_names

            names = emoji_names()
        out = []
        for text in texts:
            found = cache.get(text)
            if found is None:
                found = cache[text] = normalize_query(text, names)
            out.append(found)
        return out

    def query_text(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.text.get(self.normalized(list(texts)), "query"))  # (B, E)

    @cached_property
    def index(self) -> KeywordIndex:
        """The corpus's keywords indexed by word, under the matcher's term weights (built on first use)."""
        return KeywordIndex(self.matcher, self.keywords)

    def lexical(self, texts: list[str], index: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """(B,) query texts x images -> (B, N, K, F) lexical features. ``index``: (B, N) each query's images, -1 pads
        (all 0 there); (N,) images every query is matched against; None: the whole collection."""
        texts = self.normalized(list(texts))
        rows = None if index is None else np.asarray(index)
        if rows is None or rows.ndim == 1:
            return torch.from_numpy(np.stack([self.index.features(text, rows) for text in texts]))
        out = np.zeros((*rows.shape, self.keywords.shape[1], len(LEXICAL_FEATURES)), dtype=np.float32)
        for b, text in enumerate(texts):
            valid = rows[b] >= 0
            out[b, valid] = self.index.features(text, rows[b, valid])
        return torch.from_numpy(out)

    def candidates(self, texts: list[str], index: torch.Tensor, lexical: torch.Tensor | None = None):
        """(B, N) image indices, -1 pads -> reduced regions, region mask, keyword embeddings, lexical features
        (``lexical`` where the caller has them already, e.g. from :class:`LoggedPairs`)."""
        valid = index >= 0
        safe = index.clamp_min(0)
        reduced = self.reduced[safe]  # (B, N, R, P)
        region_mask = valid[..., None].expand(*index.shape, reduced.shape[2])  # (B, N, R)
        keyword_embeddings = self.keyword_embeddings[safe] * valid[..., None, None]  # (B, N, K, E)
        return reduced, region_mask, keyword_embeddings, self.lexical(texts, index) if lexical is None else lexical


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


def term_weights(corpus: Corpus) -> TermWeights:
    """IDF over the candidate collection: every image's auto-tagger keywords (what a served store holds)."""
    return TermWeights.from_documents(corpus.keywords)


def corpus_tensors(corpus: Corpus, model: AMC, weights: TermWeights, *, progress: bool = False) -> CorpusTensors:
    """Keyword embeddings and PCA-reduced features of every image (PCA taken from ``model``'s VAN)."""
    text = TextEmbeddings(corpus.config.cache_dir, progress=progress)
    keywords = padded_keywords(corpus.keywords)
    flat = [k for k in keywords.reshape(-1) if k]
    table = dict(zip(flat, text.get(flat, "keyword"), strict=True))
    embeddings = np.zeros((*keywords.shape, TEXT_DIM), dtype=np.float32)
    for (i, j), k in np.ndenumerate(keywords):
        if k:
            embeddings[i, j] = table[k]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(corpus.regions), 256):
            block = torch.from_numpy(corpus.regions[start:start + 256].astype(np.float32))
            chunks.append(model.van.reduce(block))
    return CorpusTensors(torch.cat(chunks), torch.from_numpy(embeddings), keywords, LexicalMatcher(weights), text)


def padded_candidates(candidate_lists: list[np.ndarray]) -> torch.Tensor:
    """(B, N) candidate indices, -1 where a list has fewer than N."""
    n = max(len(c) for c in candidate_lists)
    out = torch.full((len(candidate_lists), n), -1, dtype=torch.long)
    for b, c in enumerate(candidate_lists):
        out[b, : len(c)] = torch.from_numpy(np.asarray(c, dtype=np.int64))
    return out


class LoggedPairs:
    """What a training step needs of its queries, computed once and kept on the training device.

    Training draws its candidates from each query's logged candidate list, so the lexical features of every
    (training query, logged candidate) pair can be computed before the first step instead of in every step
    (they were the largest CPU cost of a step: 46-87 ms for 1,024 queries on the GPU machines' CPUs, more than the
    GPU's share). Rows are indexed by query (its position in the split); a step then gathers its features
    and query embeddings on the device, and nothing but the (B,) query and (B, N) candidate indices crosses
    from the CPU. The features are :meth:`CorpusTensors.lexical`'s, bit for bit.
    """

    def __init__(self, data: CorpusTensors, texts: list[str], candidate_lists: list[np.ndarray],
                 device: torch.device, *, chunk: int = 1024, progress: bool = False) -> None:
        from tqdm import tqdm

        self.candidates = padded_candidates(candidate_lists)  # (Q, L), -1 pads
        queries, slots = self.candidates.shape
        self.lexical = torch.zeros((queries, slots, data.keywords.shape[1], len(LEXICAL_FEATURES)), dtype=torch.float32)
        for start in tqdm(range(0, queries, chunk), desc="lexical features", unit="chunk", disable=not progress):
            stop = min(start + chunk, queries)
            self.lexical[start:stop] = data.lexical(texts[start:stop], self.candidates[start:stop])
        self.query_embeddings = CorpusTensors.query_text(data, list(texts))  # (Q, E), normalized, on the CPU
        self.candidates = self.candidates.to(device)
        self.lexical = self.lexical.to(device)
        self.query_embeddings = self.query_embeddings.to(device)

    def gather(self, qids: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) query rows, (B, N) image indices (each in its query's logged list, or -1) -> query embeddings
        (B, E) and lexical features (B, N, K, F), on the device."""
        logged = self.candidates[qids]  # (B, L)
        found = logged[:, None, :] == index[:, :, None]  # (B, N, L)
        # A candidate outside its query's logged list has no row here: fail rather than take slot 0's features
        # (an assert the device checks, so that it holds inside a CUDA graph without a host sync).
        torch._assert_async((found.any(-1) | (index < 0)).all(), "a candidate is not in its query's logged list")
        slot = found.int().argmax(-1)  # (B, N): position in the logged list
        lexical = self.lexical[qids[:, None], slot] * (index >= 0)[..., None, None]
        return self.query_embeddings[qids], lexical
