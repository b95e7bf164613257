"""AMC networks: the query encoder (QEN), VAN, LAN and MTN, as separate modules that export wraps one by one.

Follows Chen et al., "AMC: Attention guided Multi-modal Correlation Learning for Image Search" (CVPR 2017).
Where the paper leaves a detail open, the choice made here:

* QEN: the query's sentence embedding from the frozen, pretrained all-MiniLM-L6-v2 (``amc_model.text_encoder``:
  WordPiece subwords, so any English query has an embedding, paraphrases included), then a trainable two-layer
  MLP to ``query_dim``, with the sentence embedding itself appended (``query_skip``: q = [MLP(t), t]), so the
  later linear maps read the encoder's full semantics. The transformer runs in the serving text step; QEN's
  ONNX graph is the head.
* VAN: region features (EfficientNet-Lite0, 1280 channels) are first reduced by a fixed PCA basis estimated
  on the training images (a non-trainable buffer, so the served graph still takes raw features) and then
  projected to ``hidden`` by a learned ``W_v``. The paper's query-guided kernel ``s_q`` is applied as a 1x1
  kernel: ``logit_r = s_q . tanh(W_v v_r)``, i.e. a convolution with a kernel derived from the query, which
  also works for any number of (masked) regions.
* LAN: a keyword's embedding ``k_i`` is its MiniLM sentence embedding (keywords are often several words);
  ``f_i`` are its term-weighted lexical matches with the query (``amc_contract.text.LEXICAL_FEATURES``: IDF
  share of the keyword found in the query, of the query found in the keyword, of the query found anywhere in
  the candidate's keywords). ``p_i = softmax_i((q W_ql) . (k_i W_kl) / sqrt(hidden) + a . f_i)``,
  ``k^q = sum_i p_i (k_i W_kl + U f_i)``, with ``a`` and ``U`` learned; with ``lexical_axis``, ``k^q`` gets one
  more coordinate, the lexical evidence ``e = max_i |c| . f_i``, the strongest keyword's (``lexical_pool="max"``,
  the default; ``"attention"`` takes ``sum_i p_i (|c| . f_i)``, which dilutes an exact match among many tags;
  ``|c|``: more match is never less evidence, ``lexical_monotone``),
  which the visual vector has as 0 and ``q'`` / ``q_m`` weigh with a
  query-dependent softplus: the lexical evidence's own axis of the AMC space (reports/eval_history.md).
  Why the lexical term: embeddings blur word identity, and search queries are often the very tags an image
  carries; IDF weighting is what lets a rare word ("kiwi") count more than a frequent one ("face"), as
  BM25 does (reports/eval.md).
* MTN: ``q_m = relu(W_m q)``, ``(w_v, w_k) = softmax(tau * [cos(q', v^q), cos(q', k^q)])`` with a learned
  temperature ``tau``; ``x^q = w_v v^q + w_k k^q``; score ``cos(q_m, x^q)``. The guide ``q'`` is ``q_m`` itself
  (``mtn_guide="match"``: a modality weighs more where it alone matches the query better, which is what lets a
  candidate with noise for keywords be judged by its image) or the paper's separate ``relu(W' q)``. With
  ``gate_lexical`` (default) the language logit also gets ``softplus(g . q) * e``: how far this query trusts an
  exact tag match, so that a candidate whose tags name the query leans on its keywords and one without leans on
  its image. Training starts that trust at 4 for every query (``TrainConfig.init_lexical_gate``). MTN's
  noisy/clean visual weight ratio over 3 seeds: 1.52x without the gate, 1.89x with it, 2.50x with its trust
  starting at 4 and monotone evidence (reports/eval_history.md, rows 33-37).
* A wrong tag must not beat the picture (``visual_agreement``, issue 21). An auto-tagger adds wrong tags, and a
  wrong tag that names the query is, to LAN, exactly a right one: the keyword vector of a boar tagged "thumbs up"
  matches the query "thumbs up" as well as the real thumbs-up's does. With a trust that depends on the query alone,
  MTN handed both ~0.9 language weight, and the fused score of the boar, nearly all keyword vector, beat the real
  image's, whose visual half (a weaker match than an exact tag) pulled it down: tag spam came first for 16% of
  whole-store test queries. Only the picture tells the two apart, so the trust is signed by whether the picture
  agrees with the query: ``trust(q) * e * (2 * agree - 1)``, ``agree = sigmoid(softplus(s) * cos(q', v^q) + b)``. An
  exact match on an image that looks like the query moves weight to its keywords as before; on one that does not,
  it moves weight to the picture, whose vector does not match the query, so the candidate falls. ``softplus(s)``
  keeps it monotone (a picture that agrees more never earns less trust); both start where the sign flips at a
  picture match of about 0 (see ``ModalityFusion.__init__``), and training against whole-collection negatives
  (``training.collection``) sets them.
* The picture is not the only witness (``tag_agreement``, issue 21). For a concept the visual half never saw in
  training (a test-split emoji), no picture matches the query, so the agreement above flipped the sign of every
  exact match on it, the true ones included: "heavy equals sign", whose image carries those very tags, came 322nd of
  3,635 while BM25 put it first. A wrong auto-tag has a second tell that needs no picture: it is an outsider among
  the image's other tags, where a true tag has kin. Each keyword's coherence ``h`` (its best cosine with another
  keyword of the same image, :func:`keyword_coherence`) joins the agreement's logit,
  ``+ softplus(r) * (h - t)``, for the keyword that carries the evidence (max pooling; the attention's mix
  otherwise). It depends on the keywords alone, so a store computes it once at publish.

Masks: every softmax is over unmasked items only; padding gets exactly 0 weight. A candidate with nothing
unmasked (padding) gets zero vectors and a score of 0.

Shapes: B queries, N candidates, R regions, D region channels, K keywords, E text-embedding size (384),
F lexical features (3).

Why one module: QEN, VAN, LAN and MTN are the one network the paper draws, composed by :class:`AMC` from one
:class:`AMCConfig`, and the choices above read across them (MTN's gate weighs LAN's evidence by VAN's agreement).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("amc", "visual_only", "keywords_only", "equal_fusion")
MTN_GUIDES = ("separate", "match")
LEXICAL_POOLS = ("attention", "max")
_NEG = -1e9  # masked logit: exp(-1e9 - max) is exactly 0 in float32, so padding gets no weight
_EPS = 1e-8


ENCODER = "all-MiniLM-L6-v2"  # the only text encoder this code serves (checkpoints record theirs)
TEXT_DIM = 384
LEXICAL_DIM = 3  # len(amc_contract.text.LEXICAL_FEATURES)


@dataclass(frozen=True)
class AMCConfig:
    """Architecture of one AMC model; stored in checkpoints so export rebuilds the model from them alone."""

    encoder: str = ENCODER  # pretrained sentence encoder whose embeddings QEN and LAN read
    text_dim: int = TEXT_DIM  # its embedding size
    lexical_dim: int = LEXICAL_DIM  # lexical match features per keyword
    query_dim: int = 128  # size of QEN's learned part of the query embedding q
    # Append the sentence embedding itself to q (q = [MLP(t), t]): the later linear maps (W_ql, W', W_m) then see
    # the encoder's full 384-d semantics, not only what a head trained on a few thousand queries kept.
    query_skip: bool = True
    # A dedicated lexical axis in the AMC space: LAN's keyword vector gets one more coordinate, the attention-
    # weighted lexical evidence of the keywords, and q_m / q' a query-dependent non-negative weight for it
    # (the visual vector is 0 there). Without it, the lexical evidence is added into the same dimensions as the
    # keywords' semantics and has to compete with them; with it, an exact, informative tag match raises the
    # score and the language weight directly: the hybrid of learned and lexical evidence issue 8 asks for.
    lexical_axis: bool = True
    projection_bias: bool = False  # a bias in W_kl and W_v (see LanguageAttention)
    hidden: int = 128  # size of the AMC space where v^q, k^q and q_m live
    region_dim: int = 1280  # EfficientNet-Lite0 channels per region
    pca_dim: int = 256  # fixed PCA reduction of region features before W_v
    mode: str = "amc"  # "amc" (MTN weights), or a baseline: visual_only, keywords_only, equal_fusion
    init_temperature: float = 5.0  # MTN softmax temperature at initialisation (learned)
    # MTN's guide vector q': "match" shares q_m (each modality is weighed by how well it alone matches the query in
    # the space where the score is taken), "separate" is the paper's own q' = relu(W' q). Sharing it lifted
    # random100 R@1 from 0.688 to 0.738 over 3 seeds (reports/eval_history.md, row 15); checkpoints that predate
    # the option were trained with "separate" (amc_model.checkpoint fills it in).
    mtn_guide: str = "match"
    # How the lexical axis pools its keywords' evidence: "attention" weighs each keyword's c . f_i by LAN's
    # attention, "max" takes the strongest keyword's (an exact tag match counts in full however many other tags
    # the image has, as in BM25). Alone, "max" raised MTN's noisy/clean visual weight ratio from 1.48x to 1.76x but
    # lost test NDCG@1 and random100 R@1 over 3 seeds (reports/eval_history.md, row 21); with gate_lexical it is
    # the default (rows 33-34). Checkpoints that predate the option used "attention".
    lexical_pool: str = "max"
    # MTN's language logit also gets the candidate's lexical evidence (the lexical axis of k^q), weighed by a
    # non-negative, query-dependent trust: an exact, informative tag match moves weight to the keywords directly,
    # not through one coordinate of a 129-d cosine. With max pooling, over 3 seeds: MTN's noisy/clean visual weight
    # ratio 1.89x instead of 1.52x, ranking figures within a standard deviation (reports/eval_history.md, rows
    # 33-34). Checkpoints that predate the option have no gate.
    gate_lexical: bool = True
    # The lexical evidence c . f_i with |c|: monotone in the match features, so a fuller, more informative tag
    # match never counts as less evidence. With a free c, one seed of three learned c < 0 (an exact match
    # lowered the keywords' weight and score) once the gate trusted the evidence; checkpoints that predate the
    # option have a free c.
    lexical_monotone: bool = True
    # The trust in an exact tag match depends on whether the image agrees with the query (issue 21): the gate's term
    # is ``trust(q) * e * (2 * agree - 1)``, ``agree = sigmoid(softplus(s) * cos(q', v^q) + b)``: a tag match on
    # an image that looks like the query moves weight to the keywords, the same match on an image that does not
    # (a wrong auto-tag: tag spam) moves weight away from them, to the picture. Checkpoints that predate the option
    # trusted every match alike (``trust(q) * e``).
    visual_agreement: bool = True
    # The agreement has a second witness: the candidate's other tags (``tag_agreement``, issue 21). A wrong auto-tag
    # is an outsider among the image's tags ("thumbs up" beside "boar", "pig"), a true one has kin ("equals" beside
    # "math", "equality"): its coherence, the best cosine between its embedding and another tag's of the same image,
    # tells the two apart without the picture (AUC 0.77 on the corpus's auto-tags, seed 0). The picture alone cannot
    # for concepts the visual half never saw, and it pushed their true, exact tag matches hundreds of rows down.
    # ``agree = sigmoid(softplus(s) * cos(q', v^q) + b + softplus(r) * (h - t))``, h the coherence of the keyword
    # that carries the evidence. LAN hands h to MTN as one more coordinate of its keyword vector (MTN takes it off
    # before any cosine). Checkpoints that predate the option have no such witness.
    tag_agreement: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.lexical_pool not in LEXICAL_POOLS:
            raise ValueError(f"unknown lexical_pool {self.lexical_pool!r}; expected one of {LEXICAL_POOLS}")
        if self.gate_lexical and not self.lexical_axis:
            raise ValueError("gate_lexical needs lexical_axis: the gate reads the lexical evidence on that axis")
        if self.visual_agreement and not self.gate_lexical:
            raise ValueError("visual_agreement needs gate_lexical: it scales the gate's trust in a tag match")
        if self.tag_agreement and not self.visual_agreement:
            raise ValueError("tag_agreement needs visual_agreement: it is the agreement's second witness")
        if self.mtn_guide not in MTN_GUIDES:
            raise ValueError(f"unknown mtn_guide {self.mtn_guide!r}; expected one of {MTN_GUIDES}")

    @classmethod
    def from_dict(cls, values: dict) -> AMCConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AMCConfig keys: {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def query_embedding_dim(self) -> int:
        """Size of q, QEN's output (the ``query_dim`` axis of the served tensors)."""
        return self.query_dim + (self.text_dim if self.query_skip else 0)

    @property
    def keyword_vector_dim(self) -> int:
        """Size of LAN's output (the ``keyword_hidden`` axis): k^q's ``hidden``, plus the lexical axis if there is
        one, plus the evidence keyword's coherence with ``tag_agreement`` (not part of k^q: MTN takes it off)."""
        return self.hidden + (1 if self.lexical_axis else 0) + (1 if self.tag_agreement else 0)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``mask``; all-masked rows give all zeros (not NaN)."""
    weights = torch.softmax(logits.masked_fill(~mask, _NEG), dim=-1)
    return weights * mask.to(weights.dtype)


# The coherence of a candidate's only keyword: no other tag can vouch for it or against it, so a value near the
# agreement's starting threshold t (0.4; trained models end near 0.5) leaves the picture to decide.
LONE_KEYWORD_COHERENCE = 0.5
# Keywords whose evidence is within this (relative, plus as much absolute) of the strongest's count as tied with it:
# the coherence passed on is the best among them, so that PyTorch and onnxruntime, whose sums round differently, pass
# on the same value where two keywords' evidence is equal but for rounding.
EVIDENCE_TIE = 1e-4


def keyword_coherence(keyword_embeddings: torch.Tensor, keyword_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(..., K, E) keyword embeddings (zero vectors pad) -> (..., K): each keyword's best cosine with another real
    keyword of the same candidate; :data:`LONE_KEYWORD_COHERENCE` for a candidate's only keyword, 0 for padding.
    Depends on the keywords alone, so a candidate store computes it once."""
    if keyword_mask is None:
        keyword_mask = (keyword_embeddings != 0).any(-1)  # (..., K)
    unit = keyword_embeddings / keyword_embeddings.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    similarity = unit @ unit.transpose(-1, -2)  # (..., K, K)
    # A keyword is not its own kin: the diagonal and the padding sink below any cosine (a float eye: onnxruntime has
    # no boolean EyeLike).
    self_match = torch.eye(keyword_mask.shape[-1], dtype=similarity.dtype, device=similarity.device)  # (K, K)
    best = (similarity.masked_fill(~keyword_mask.unsqueeze(-2), -4.0) - 8.0 * self_match).amax(-1)  # (..., K)
    lone = torch.full_like(best, LONE_KEYWORD_COHERENCE)
    return torch.where(keyword_mask, torch.where(best > -2.0, best, lone), torch.zeros_like(best))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine over the last axis; 0 when either side is a zero vector."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(_EPS)


class QueryEncoder(nn.Module):
    """QEN head: the query's sentence embedding (B, E) -> query embedding q (B, query_dim)."""

    def __init__(self, cfg: AMCConfig) -> None:
        super().__init__()
        self.skip = cfg.query_skip
        self.mlp = nn.Sequential(nn.Linear(cfg.text_dim, 2 * cfg.query_dim), nn.ReLU(),
                                 nn.Linear(2 * cfg.query_dim, cfg.query_dim))

    def forward(self, query_text: torch.Tensor) -> torch.Tensor:
        q = self.mlp(query_text)  # (B, query_dim)
        return torch.cat([q, query_text], dim=-1) if self.skip else q  # (B, Q)


class VisualAttention(nn.Module):
    """VAN: query-guided attention over image regions."""

    def __init__(self, cfg: AMCConfig) -> None:
        super().__init__()
        self.register_buffer("region_mean", torch.zeros(cfg.region_dim))
        self.register_buffer("region_basis", torch.eye(cfg.region_dim, cfg.pca_dim))
        self.project = nn.Linear(cfg.pca_dim, cfg.hidden, bias=cfg.projection_bias)  # W_v
        self.kernel = nn.Linear(cfg.query_embedding_dim, cfg.hidden)  # q -> s_q

    def reduce(self, regions: torch.Tensor) -> torch.Tensor:
        """Fixed PCA: (..., D) -> (..., P). Training applies it once to the cached features."""
        return (regions - self.region_mean) @ self.region_basis

    def forward(self, query_embedding: torch.Tensor, regions: torch.Tensor,
                region_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_reduced(query_embedding, self.reduce(regions), region_mask)

    def forward_reduced(self, query_embedding: torch.Tensor, reduced: torch.Tensor,
                        region_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_projected(query_embedding, self.project(reduced), region_mask)

    def forward_projected(self, query_embedding: torch.Tensor, u: torch.Tensor,
                          region_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAN from the regions' projection ``u = W_v PCA(regions)`` (B, N, R, H) on: a store keeps ``u`` per image
        at publish, so its steps start here -> visual vectors (B, N, H), region attention (B, N, R)."""
        s_q = self.kernel(query_embedding)[:, None, None, :]  # (B, 1, 1, H)
        logits = (torch.tanh(u) * s_q).sum(-1)  # (B, N, R)
        attention = masked_softmax(logits, region_mask)  # (B, N, R)
        visual = (attention.unsqueeze(-1) * u).sum(2)  # (B, N, H)
        return visual, attention

    def forward_shared(self, query_embedding: torch.Tensor, u: torch.Tensor,
                       tanh_u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_projected` for B queries against the same N images, every region real: ``u`` (N, R, H)
        (and its tanh, when the caller keeps it) once, not repeated per query -> (B, N, H), (B, N, R)."""
        logits = torch.einsum("nrh,bh->bnr", torch.tanh(u) if tanh_u is None else tanh_u, self.kernel(query_embedding))
        attention = torch.softmax(logits, dim=-1)  # (B, N, R)
        return torch.einsum("bnr,nrh->bnh", attention, u), attention


class LanguageAttention(nn.Module):
    """LAN: query-guided attention over a candidate's keywords."""

    def __init__(self, cfg: AMCConfig) -> None:
        super().__init__()
        # W_kl (and VAN's W_v) without a bias: a bias puts a constant component in every k^q (v^q), whatever the
        # keywords (image), so that cos(q', k^q) could not tell MTN whether a candidate's keywords agree with it.
        self.key = nn.Linear(cfg.text_dim, cfg.hidden, bias=cfg.projection_bias)  # W_kl
        self.query = nn.Linear(cfg.query_embedding_dim, cfg.hidden)  # W_ql
        self.lexical_vector = nn.Linear(cfg.lexical_dim, cfg.hidden, bias=False)  # U
        self.lexical_logit = nn.Linear(cfg.lexical_dim, 1, bias=False)  # a
        self.lexical_score = nn.Linear(cfg.lexical_dim, 1, bias=False) if cfg.lexical_axis else None
        self.lexical_pool = cfg.lexical_pool
        self.lexical_monotone = cfg.lexical_monotone
        self.tag_agreement = cfg.tag_agreement
        self.scale = cfg.hidden**-0.5

    def project(self, keyword_embeddings: torch.Tensor) -> torch.Tensor:
        """``k_i W_kl``: depends on the keywords alone, so the candidate store precomputes it."""
        return self.key(keyword_embeddings)

    def coherence(self, keyword_embeddings: torch.Tensor) -> torch.Tensor | None:
        """:func:`keyword_coherence` where the model reads it (``tag_agreement``), else None; a store keeps it."""
        return keyword_coherence(keyword_embeddings) if self.tag_agreement else None

    def forward(self, query_embedding: torch.Tensor, keyword_embeddings: torch.Tensor,
                keyword_lexical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keyword_mask = (keyword_embeddings != 0).any(-1)  # (B, N, K): padding is the zero vector
        coherence = keyword_coherence(keyword_embeddings, keyword_mask) if self.tag_agreement else None
        return self.forward_projected(query_embedding, self.project(keyword_embeddings), keyword_mask,
                                      keyword_lexical, coherence)

    def forward_projected(self, query_embedding: torch.Tensor, projected: torch.Tensor, keyword_mask: torch.Tensor,
                          keyword_lexical: torch.Tensor, coherence: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """LAN from the keywords' projection ``k_i W_kl`` (B, N, K, H) on, and with ``tag_agreement`` their
        :func:`keyword_coherence` (B, N, K) -> keyword vectors (B, N, keyword_vector_dim), attention (B, N, K)."""
        k = projected + self.lexical_vector(keyword_lexical)  # (B, N, K, H)
        q = self.query(query_embedding)[:, None, None, :]  # (B, 1, 1, H)
        logits = (k * q).sum(-1) * self.scale + self.lexical_logit(keyword_lexical).squeeze(-1)  # (B, N, K)
        attention = masked_softmax(logits, keyword_mask)  # (B, N, K)
        keyword_vector = (attention.unsqueeze(-1) * k).sum(2)  # (B, N, H)
        return self._with_evidence(keyword_vector, keyword_lexical, attention, keyword_mask, coherence), attention

    def forward_shared(self, query_embedding: torch.Tensor, projected: torch.Tensor, keyword_mask: torch.Tensor,
                       keyword_lexical: torch.Tensor, coherence: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_projected` for B queries against the same N candidates: ``projected`` (N, K, H),
        ``keyword_mask`` and ``coherence`` (N, K) once, ``keyword_lexical`` (B, N, K, F) per query. The same function, computed
        without the (B, N, K, H) keys: ``k_i = P_i + U f_i`` is split into its shared and its low-rank (F = 3)
        part, so whole-store scoring costs one matrix product per query over the stored keywords."""
        q = self.query(query_embedding)  # (B, H)
        u_q = q @ self.lexical_vector.weight  # (B, F): U^T q
        logits = (torch.einsum("nkh,bh->bnk", projected, q) + torch.einsum("bnkf,bf->bnk", keyword_lexical, u_q)) \
            * self.scale + self.lexical_logit(keyword_lexical).squeeze(-1)  # (B, N, K)
        mask = keyword_mask.expand(logits.shape)
        attention = masked_softmax(logits, mask)  # (B, N, K)
        keyword_vector = torch.einsum("bnk,nkh->bnh", attention, projected) + self.lexical_vector(
            torch.einsum("bnk,bnkf->bnf", attention, keyword_lexical))  # (B, N, H)
        if coherence is not None:
            coherence = coherence.expand(mask.shape)
        return self._with_evidence(keyword_vector, keyword_lexical, attention, mask, coherence), attention

    def _with_evidence(self, keyword_vector: torch.Tensor, keyword_lexical: torch.Tensor, attention: torch.Tensor,
                       keyword_mask: torch.Tensor, coherence: torch.Tensor | None) -> torch.Tensor:
        """k^q (B, N, H) -> LAN's output: the lexical axis appended (the strongest keyword's evidence, or LAN's
        attention-weighted one), then with ``tag_agreement`` the coherence of that keyword (of the attention's mix)."""
        if self.lexical_score is None:
            return keyword_vector
        c = self.lexical_score.weight.abs() if self.lexical_monotone else self.lexical_score.weight  # (1, 3)
        per_keyword = F.linear(keyword_lexical, c).squeeze(-1)  # (B, N, K)
        has_keywords = keyword_mask.any(-1, keepdim=True)  # (B, N, 1): a candidate without keywords gets 0
        if self.lexical_pool == "max":
            strongest = per_keyword.masked_fill(~keyword_mask, _NEG).amax(-1, keepdim=True)  # (B, N, 1)
            evidence = strongest * has_keywords
        else:
            evidence = (attention * per_keyword).sum(-1, keepdim=True)  # (B, N, 1)
        parts = [keyword_vector, evidence]
        if self.tag_agreement:
            if coherence is None:
                raise ValueError("this LAN reads its keywords' coherence (tag_agreement): pass coherence")
            if self.lexical_pool == "max":  # the best coherence among the keywords tied for the strongest evidence
                tied = keyword_mask & (per_keyword >= strongest - EVIDENCE_TIE * (strongest.abs() + 1))  # (B, N, K)
                chosen = coherence.masked_fill(~tied, -2.0).amax(-1, keepdim=True)  # (B, N, 1)
                parts.append(chosen * has_keywords)
            else:
                parts.append((attention * coherence).sum(-1, keepdim=True))
        return torch.cat(parts, dim=-1)  # (B, N, H + 1 [+ 1])


class ModalityFusion(nn.Module):
    """MTN: query-guided weights between the visual and the language vector, and the relevance score."""

    def __init__(self, cfg: AMCConfig) -> None:
        super().__init__()
        self.mode = cfg.mode
        self.guide = None if cfg.mtn_guide == "match" else nn.Linear(cfg.query_embedding_dim, cfg.hidden)  # W'
        self.match = nn.Linear(cfg.query_embedding_dim, cfg.hidden)  # W_m: q_m = relu(W_m q)
        self.log_temperature = nn.Parameter(torch.tensor(float(cfg.init_temperature)).log())
        # The lexical axis's weight in q' and q_m (softplus: >= 0), one per query.
        self.lexical = nn.Linear(cfg.query_embedding_dim, 2) if cfg.lexical_axis else None
        self.gate_lexical = nn.Linear(cfg.query_embedding_dim, 1) if cfg.gate_lexical else None  # g: trust(q)
        # agree = sigmoid(softplus(s) * cos(q', v^q) + b), starting at softplus(s) = 8, b = 0: the sign flips where the
        # picture's match is about 0, between what trained models give a query's target (median 0.25) and a random
        # image (median -0.09, 90% below 0.03; seed 0). Started flat (b = 3), it barely moved in training.
        self.agreement = nn.Parameter(torch.tensor([8.0, 0.0])) if cfg.visual_agreement else None  # s, b
        # The tags' witness (tag_agreement): softplus(r) * (h - t), starting at softplus(r) = 4, t = 0.4, between the
        # coherence of true auto-tags (median 0.49) and wrong ones (median 0.33; seed 0's corpus).
        self.tag_witness = nn.Parameter(torch.tensor([math.log(math.expm1(4.0)), 0.4])) if cfg.tag_agreement \
            else None  # r, t

    def start_gate_at(self, trust: float) -> None:
        """Initialise the lexical gate so that every query's trust ``softplus(g . q)`` starts near ``trust`` (g's
        bias; its query-dependent part starts small). Training only: a checkpoint carries the learned gate."""
        if self.gate_lexical is None:
            return
        if not (math.isfinite(trust) and 0 < trust <= 50):
            raise ValueError(f"the lexical gate's initial trust must be in (0, 50], got {trust}")
        with torch.no_grad():
            self.gate_lexical.bias.fill_(math.log(math.expm1(trust)))  # softplus(bias) = trust

    def split(self, keyword_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LAN's output -> k^q (B, N, H [+ 1]) and the evidence keyword's coherence (B, N) (None without
        ``tag_agreement``)."""
        if self.tag_witness is None:
            return keyword_output, None
        return keyword_output[..., :-1], keyword_output[..., -1]

    def forward(self, query_embedding: torch.Tensor, visual_vector: torch.Tensor,
                keyword_vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keyword_vector, coherence = self.split(keyword_vector)
        q_guide, q_match = self.query_vectors(query_embedding)  # (B, H [+ 1]) each
        if self.lexical is not None:
            visual_vector = F.pad(visual_vector, (0, 1))  # (B, N, H + 1): images have no lexical evidence
        q_guide, q_match = q_guide.unsqueeze(1), q_match.unsqueeze(1)  # (B, 1, H [+ 1])
        weights = self._weights(query_embedding, q_guide, visual_vector, keyword_vector, coherence)  # (B, N, 2)
        fused = weights[..., :1] * visual_vector + weights[..., 1:] * keyword_vector  # (B, N, H)
        return cosine(q_match, fused), weights  # (B, N), (B, N, 2)

    def query_vectors(self, query_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q'`` and ``q_m`` (B, H), each with the lexical axis's weight appended when the model has one."""
        q_match = torch.relu(self.match(query_embedding))  # (B, H)
        q_guide = q_match if self.guide is None else torch.relu(self.guide(query_embedding))  # (B, H)
        if self.lexical is not None:
            axis = F.softplus(self.lexical(query_embedding))  # (B, 2)
            q_guide = torch.cat([q_guide, axis[:, :1]], dim=-1)  # (B, H + 1)
            q_match = torch.cat([q_match, axis[:, 1:]], dim=-1)
        return q_guide, q_match

    def match_vector(self, query_embedding: torch.Tensor) -> torch.Tensor:
        """``q_m`` (B, H) without the lexical axis: what the visual-only auxiliary losses score against."""
        return torch.relu(self.match(query_embedding))

    def _weights(self, query_embedding: torch.Tensor, q_guide: torch.Tensor, visual: torch.Tensor,
                 keyword: torch.Tensor, coherence: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "amc":
            temperature = self.log_temperature.exp()
            visual_match = cosine(q_guide, visual)  # (B, N)
            language = cosine(q_guide, keyword) * temperature
            if self.gate_lexical is not None:  # trust(q) (B, 1) x the candidates' lexical evidence (B, N)
                evidence = F.softplus(self.gate_lexical(query_embedding)) * keyword[..., -1]
                if self.agreement is not None:  # signed by whether the picture agrees with the query
                    logit = F.softplus(self.agreement[0]) * visual_match + self.agreement[1]
                    if coherence is not None:  # and whether its other tags agree with the matching one
                        logit = logit + F.softplus(self.tag_witness[0]) * (coherence - self.tag_witness[1])
                    agree = torch.sigmoid(logit)
                    evidence = evidence * (2 * agree - 1)
                language = language + evidence
            return torch.softmax(torch.stack([visual_match * temperature, language], dim=-1), dim=-1)
        fixed = {"visual_only": (1.0, 0.0), "keywords_only": (0.0, 1.0), "equal_fusion": (0.5, 0.5)}[self.mode]
        return visual.new_tensor(fixed).expand(*visual.shape[:-1], 2)


@dataclass
class AMCOutput:
    scores: torch.Tensor  # (B, N)
    modality_weights: torch.Tensor  # (B, N, 2): visual, language
    region_attention: torch.Tensor  # (B, N, R)
    keyword_attention: torch.Tensor  # (B, N, K)
    visual_vector: torch.Tensor | None = None  # (B, N, H): v^q, for training's single-modality auxiliary losses
    # (B, N, keyword_vector_dim): LAN's output, k^q with the tags' coherence last (ModalityFusion.split takes it off)
    keyword_vector: torch.Tensor | None = None
    query_embedding: torch.Tensor | None = None  # (B, Q)


class AMC(nn.Module):
    """The four networks together, for training and as the PyTorch reference that served scores must match."""

    def __init__(self, cfg: AMCConfig) -> None:
        super().__init__()
        self.config = cfg
        self.qen = QueryEncoder(cfg)
        self.van = VisualAttention(cfg)
        self.lan = LanguageAttention(cfg)
        self.mtn = ModalityFusion(cfg)

    def set_region_pca(self, mean: torch.Tensor, basis: torch.Tensor) -> None:
        self.van.region_mean.copy_(mean)
        self.van.region_basis.copy_(basis)

    def forward(self, query_text: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor,
                keyword_embeddings: torch.Tensor, keyword_lexical: torch.Tensor, *,
                reduced: bool = False) -> AMCOutput:
        """Scores candidates. ``reduced=True`` takes PCA-reduced regions (B, N, R, P), as training caches them.

        query_text (B, E): the query's sentence embedding; keyword_embeddings (B, N, K, E), zero vectors pad;
        keyword_lexical (B, N, K, F).
        """
        q = self.qen(query_text)
        van = self.van.forward_reduced if reduced else self.van
        visual, region_attention = van(q, regions, region_mask)
        keyword, keyword_attention = self.lan(q, keyword_embeddings, keyword_lexical)
        scores, weights = self.mtn(q, visual, keyword)
        return AMCOutput(scores, weights, region_attention, keyword_attention, visual, keyword, q)


def ranking_loss(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """Paper's loss: column 0 of ``scores`` (B, 1 + t) is the clicked image, the rest are t unclicked ones.

    ``sum_t max(0, margin - s+ + s-_t)``, averaged over queries.
    """
    positive, negatives = scores[:, :1], scores[:, 1:]
    return torch.clamp(margin - positive + negatives, min=0).sum(1).mean()
