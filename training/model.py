"""AMC networks: the query encoder (QEN), VAN, LAN and MTN, as separate modules that export wraps one by one.

Follows Chen et al., "AMC: Attention guided Multi-modal Correlation Learning for Image Search" (CVPR 2017).
Where the paper leaves a detail open, the choice made here:

* QEN: frozen GloVe word vectors, masked mean- and max-pooling, then a two-layer MLP to ``query_dim``.
  Pooling (not a recurrent net) because queries are short tag-like phrases and it exports to plain ONNX.
* VAN: region features (EfficientNet-Lite0, 1280 channels) are first reduced by a fixed PCA basis estimated
  on the training images (a non-trainable buffer, so the served graph still takes raw features) and then
  projected to ``hidden`` by a learned ``W_v``. The paper's query-guided kernel ``s_q`` is applied as a 1x1
  kernel: ``logit_r = s_q . tanh(W_v v_r)``, i.e. a convolution with a kernel derived from the query, which
  also works for any number of (masked) regions.
* LAN: a keyword's embedding is the mean of its words' GloVe vectors (keywords are often several words),
  ``p_i = softmax_i((q W_ql) . (k_i W_kl) / sqrt(hidden) + a m_i)``, ``k^q = sum_i p_i (k_i W_kl + m_i u)``,
  where ``m_i`` is the share of keyword i's words that occur in the query and ``a``, ``u`` are learned.
  Why the exact-match term: frozen 50-d GloVe vectors blur word identity ("cat" is close to "dog"), and
  search queries are often the very tags an image carries; without it, BM25 over the keywords beat the
  learned models (reports/eval.md).
* MTN: ``q' = relu(W' q)``, ``q_m = relu(W_m q)``, ``(w_v, w_k) = softmax(tau * [cos(q', v^q), cos(q', k^q)])``
  with a learned temperature ``tau``; ``x^q = w_v v^q + w_k k^q``; score ``cos(q_m, x^q)``.

Masks: every softmax is over unmasked items only; padding gets exactly 0 weight. A candidate with nothing
unmasked (padding) gets zero vectors and a score of 0.

Shapes: B queries, N candidates, R regions, D region channels, K keywords, W words per keyword, L query words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("amc", "visual_only", "keywords_only", "equal_fusion")
_NEG = -1e9  # masked logit: exp(-1e9 - max) is exactly 0 in float32, so padding gets no weight
_EPS = 1e-8


@dataclass(frozen=True)
class AMCConfig:
    """Architecture of one AMC model; stored in checkpoints so export rebuilds the model from them alone."""

    vocab_size: int  # rows of the word-vector tables (index 0 pads)
    word_dim: int = 50  # GloVe 6B 50d
    query_dim: int = 128  # size of the query embedding q
    hidden: int = 128  # size of the AMC space where v^q, k^q and q_m live
    region_dim: int = 1280  # EfficientNet-Lite0 channels per region
    pca_dim: int = 256  # fixed PCA reduction of region features before W_v
    mode: str = "amc"  # "amc" (MTN weights), or a baseline: visual_only, keywords_only, equal_fusion
    init_temperature: float = 5.0  # MTN softmax temperature at initialisation (learned)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")

    @classmethod
    def from_dict(cls, values: dict) -> AMCConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AMCConfig keys: {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``mask``; all-masked rows give all zeros (not NaN)."""
    weights = torch.softmax(logits.masked_fill(~mask, _NEG), dim=-1)
    return weights * mask.to(weights.dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine over the last axis; 0 when either side is a zero vector."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(_EPS)


class WordEmbedding(nn.Module):
    """Frozen pretrained word vectors (a buffer, so it exports as a constant and never trains)."""

    def __init__(self, vocab_size: int, word_dim: int) -> None:
        super().__init__()
        self.register_buffer("vectors", torch.zeros(vocab_size, word_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.vectors)


class QueryEncoder(nn.Module):
    """QEN: query word ids (B, L) -> query embedding q (B, query_dim)."""

    def __init__(self, cfg: AMCConfig) -> None:
        super().__init__()
        self.embed = WordEmbedding(cfg.vocab_size, cfg.word_dim)
        self.mlp = nn.Sequential(nn.Linear(2 * cfg.word_dim, 2 * cfg.query_dim), nn.ReLU(),
                                 nn.Linear(2 * cfg.query_dim, cfg.query_dim))

    def forward(self, query_tokens: torch.Tensor) -> torch.Tensor:
        mask = (query_tokens > 0).unsqueeze(-1)  # (B, L, 1)
        e = self.embed(query_tokens)  # (B, L, E)
        count = mask.sum(1).clamp_min(1)  # (B, 1)
        mean = (e * mask).sum(1) / count  # (B, E)
        peak = e.masked_fill(~mask, _NEG).amax(1)  # (B, E)
        peak = torch.where(mask.any(1), peak, torch.zeros_like(peak))
        return self.mlp(torch.cat([mean, peak], dim=-1))  # (B, Q)


class VisualAttention(nn.Module):
    """VAN: query-guided attention over image regions."""

    def __init__(self, cfg: AMCConfig) -> None:
        super().__init__()
        self.register_buffer("region_mean", torch.zeros(cfg.region_dim))
        self.register_buffer("region_basis", torch.eye(cfg.region_dim, cfg.pca_dim))
        self.project = nn.Linear(cfg.pca_dim, cfg.hidden)  # W_v
        self.kernel = nn.Linear(cfg.query_dim, cfg.hidden)  # q -> s_q

    def reduce(self, regions: torch.Tensor) -> torch.Tensor:
        """Fixed PCA: (..., D) -> (..., P). Training applies it once to the cached features."""
        return (regions - self.region_mean) @ self.region_basis

    def forward(self, query_embedding: torch.Tensor, regions: torch.Tensor,
                region_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_reduced(query_embedding, self.reduce(regions), region_mask)

    def forward_reduced(self, query_embedding: torch.Tensor, reduced: torch.Tensor,
                        region_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.project(reduced)  # (B, N, R, H)
        s_q = self.kernel(query_embedding)[:, None, None, :]  # (B, 1, 1, H)
        logits = (torch.tanh(u) * s_q).sum(-1)  # (B, N, R)
        attention = masked_softmax(logits, region_mask)  # (B, N, R)
        visual = (attention.unsqueeze(-1) * u).sum(2)  # (B, N, H)
        return visual, attention


class LanguageAttention(nn.Module):
    """LAN: query-guided attention over a candidate's keywords."""

    def __init__(self, cfg: AMCConfig) -> None:
        super().__init__()
        self.embed = WordEmbedding(cfg.vocab_size, cfg.word_dim)
        self.key = nn.Linear(cfg.word_dim, cfg.hidden)  # W_kl
        self.query = nn.Linear(cfg.query_dim, cfg.hidden)  # W_ql
        self.match_direction = nn.Parameter(torch.randn(cfg.hidden) / cfg.hidden**0.5)  # u
        self.match_weight = nn.Parameter(torch.tensor(1.0))  # a
        self.scale = cfg.hidden**-0.5

    def forward(self, query_embedding: torch.Tensor, query_tokens: torch.Tensor,
                keyword_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        word_mask = (keyword_tokens > 0).unsqueeze(-1)  # (B, N, K, W, 1)
        words = self.embed(keyword_tokens) * word_mask  # (B, N, K, W, E)
        keyword_mask = word_mask.squeeze(-1).any(-1)  # (B, N, K): keywords with >= 1 known word
        count = word_mask.sum(3).clamp_min(1)  # (B, N, K, 1)
        k = words.sum(3) / count  # (B, N, K, E)
        # Exact match: share of each keyword's words found among the query's words (padding never matches).
        in_query = (keyword_tokens.unsqueeze(-1) == query_tokens[:, None, None, None, :]).any(-1)  # (B, N, K, W)
        match = (in_query & word_mask.squeeze(-1)).sum(-1, keepdim=True) / count  # (B, N, K, 1)
        k = self.key(k) + match * self.match_direction  # (B, N, K, H)
        q = self.query(query_embedding)[:, None, None, :]  # (B, 1, 1, H)
        logits = (k * q).sum(-1) * self.scale + self.match_weight * match.squeeze(-1)  # (B, N, K)
        attention = masked_softmax(logits, keyword_mask)  # (B, N, K)
        keyword_vector = (attention.unsqueeze(-1) * k).sum(2)  # (B, N, H)
        return keyword_vector, attention


class ModalityFusion(nn.Module):
    """MTN: query-guided weights between the visual and the language vector, and the relevance score."""

    def __init__(self, cfg: AMCConfig) -> None:
        super().__init__()
        self.mode = cfg.mode
        self.guide = nn.Linear(cfg.query_dim, cfg.hidden)  # W': q' = relu(W' q)
        self.match = nn.Linear(cfg.query_dim, cfg.hidden)  # W_m: q_m = relu(W_m q)
        self.log_temperature = nn.Parameter(torch.tensor(float(cfg.init_temperature)).log())

    def forward(self, query_embedding: torch.Tensor, visual_vector: torch.Tensor,
                keyword_vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_guide = torch.relu(self.guide(query_embedding)).unsqueeze(1)  # (B, 1, H)
        q_match = torch.relu(self.match(query_embedding)).unsqueeze(1)  # (B, 1, H)
        weights = self._weights(q_guide, visual_vector, keyword_vector)  # (B, N, 2)
        fused = weights[..., :1] * visual_vector + weights[..., 1:] * keyword_vector  # (B, N, H)
        return cosine(q_match, fused), weights  # (B, N), (B, N, 2)

    def _weights(self, q_guide: torch.Tensor, visual: torch.Tensor, keyword: torch.Tensor) -> torch.Tensor:
        if self.mode == "amc":
            logits = torch.stack([cosine(q_guide, visual), cosine(q_guide, keyword)], dim=-1)
            return torch.softmax(logits * self.log_temperature.exp(), dim=-1)
        fixed = {"visual_only": (1.0, 0.0), "keywords_only": (0.0, 1.0), "equal_fusion": (0.5, 0.5)}[self.mode]
        return visual.new_tensor(fixed).expand(*visual.shape[:-1], 2)


@dataclass
class AMCOutput:
    scores: torch.Tensor  # (B, N)
    modality_weights: torch.Tensor  # (B, N, 2): visual, language
    region_attention: torch.Tensor  # (B, N, R)
    keyword_attention: torch.Tensor  # (B, N, K)


class AMC(nn.Module):
    """The four networks together, for training and as the PyTorch reference that served scores must match."""

    def __init__(self, cfg: AMCConfig) -> None:
        super().__init__()
        self.config = cfg
        self.qen = QueryEncoder(cfg)
        self.van = VisualAttention(cfg)
        self.lan = LanguageAttention(cfg)
        self.mtn = ModalityFusion(cfg)

    def set_word_vectors(self, vectors: torch.Tensor) -> None:
        self.qen.embed.vectors.copy_(vectors)
        self.lan.embed.vectors.copy_(vectors)

    def set_region_pca(self, mean: torch.Tensor, basis: torch.Tensor) -> None:
        self.van.region_mean.copy_(mean)
        self.van.region_basis.copy_(basis)

    def forward(self, query_tokens: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor,
                keyword_tokens: torch.Tensor, *, reduced: bool = False) -> AMCOutput:
        """Scores candidates. ``reduced=True`` takes PCA-reduced regions (B, N, R, P), as training caches them."""
        q = self.qen(query_tokens)
        van = self.van.forward_reduced if reduced else self.van
        visual, region_attention = van(q, regions, region_mask)
        keyword, keyword_attention = self.lan(q, query_tokens, keyword_tokens)
        scores, weights = self.mtn(q, visual, keyword)
        return AMCOutput(scores, weights, region_attention, keyword_attention)


def ranking_loss(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """Paper's loss: column 0 of ``scores`` (B, 1 + t) is the clicked image, the rest are t unclicked ones.

    ``sum_t max(0, margin - s+ + s-_t)``, averaged over queries.
    """
    positive, negatives = scores[:, :1], scores[:, 1:]
    return torch.clamp(margin - positive + negatives, min=0).sum(1).mean()
