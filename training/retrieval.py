"""Whole-collection scoring: every query against a shared set of images (the whole store), with the full model.

A whole-store search scores each query against every stored image, and training against the collection scores each
query of a batch against images drawn from it. Both share candidates across queries, so the parts of VAN and LAN
that depend on the image alone (``u = W_v PCA(regions)``, ``W_kl k``) are computed once per image, not once per
(query, image) pair as :meth:`amc_model.model.AMC.forward` does for per-query candidate lists:

* :func:`score_shared`: queries (B,) x images (N,) -> the full model's scores (B, N), MTN included, with autograd
  (training's collection loss);
* :class:`CollectionScorer`: every image of a corpus, projected once; ``scores(texts)`` (Q, G) in chunks, no
  autograd (the ``whole_store`` protocol, and mining the images the current model wrongly ranks first).

The lexical features of a (query, image) pair come from :meth:`training.data.CorpusTensors.lexical`.
"""

from __future__ import annotations

import numpy as np
import torch

from amc_model.model import AMC
from training.data import CorpusTensors


def score_shared(model: AMC, query_text: torch.Tensor, reduced: torch.Tensor, keyword_embeddings: torch.Tensor,
                 keyword_lexical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full model's scores of B queries against the same N images (every region and keyword real).

    query_text (B, E) sentence embeddings; reduced (N, R, P) PCA-reduced regions; keyword_embeddings (N, K, E), zero
    vectors pad; keyword_lexical (B, N, K, F). Returns scores (B, N) and MTN's weights (B, N, 2); equal to
    ``model(query_text, reduced[None].expand(B, ...), ..., reduced=True)`` without repeating the per-image work.
    """
    u = model.van.project(reduced)  # (N, R, H): once per image
    return score_projected(model, model.qen(query_text), u, torch.tanh(u), model.lan.project(keyword_embeddings),
                           (keyword_embeddings != 0).any(-1), keyword_lexical, model.lan.coherence(keyword_embeddings))


def score_projected(model: AMC, q: torch.Tensor, u: torch.Tensor, tanh_u: torch.Tensor,
                    keyword_projected: torch.Tensor, keyword_mask: torch.Tensor,
                    keyword_lexical: torch.Tensor, coherence: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """VAN, LAN and MTN from the images' projections: q (B, Q) query embeddings; u = W_v PCA(regions) (N, R, H) and
    its tanh; keyword_projected (N, K, H), keyword_mask and (``tag_agreement``) the keywords' coherence (N, K);
    keyword_lexical (B, N, K, F) -> scores (B, N), MTN's weights (B, N, 2)."""
    visual, _ = model.van.forward_shared(q, u, tanh_u)  # (B, N, H)
    keyword, _ = model.lan.forward_shared(q, keyword_projected, keyword_mask, keyword_lexical, coherence)
    return model.mtn(q, visual, keyword)


class CollectionScorer:
    """Scores queries against every image of ``data`` with ``model`` (eval mode, no autograd), ``batch`` queries at a
    time; the images' projections are computed once, here."""

    def __init__(self, model: AMC, data: CorpusTensors, *, batch: int = 8) -> None:
        model.eval()
        self.model, self.data, self.batch = model, data, batch
        with torch.no_grad():
            self.u = torch.cat([model.van.project(data.reduced[s:s + 512]) for s in range(0, len(data.reduced), 512)])
            self.tanh_u = torch.tanh(self.u)  # (G, R, H)
            self.keyword_projected = model.lan.project(data.keyword_embeddings)  # (G, K, H)
            self.coherence = model.lan.coherence(data.keyword_embeddings)  # (G, K) or None
        self.keyword_mask = (data.keyword_embeddings != 0).any(-1)  # (G, K)

    @torch.no_grad()
    def scores(self, texts: list[str]) -> np.ndarray:
        """(Q,) query texts -> (Q, G) float32 scores of every image."""
        out = np.zeros((len(texts), len(self.u)), dtype=np.float32)
        for start in range(0, len(texts), self.batch):
            chunk = list(texts[start:start + self.batch])
            out[start:start + len(chunk)] = self._chunk(chunk).cpu().numpy()
        return out

    def _chunk(self, texts: list[str]) -> torch.Tensor:
        q = self.model.qen(self.data.query_text(texts))  # (b, Q)
        lexical = self.data.lexical(texts).to(q.device)  # (b, G, K, F)
        scores, _ = score_projected(self.model, q, self.u, self.tanh_u, self.keyword_projected, self.keyword_mask,
                                    lexical, self.coherence)
        return scores  # (b, G)
