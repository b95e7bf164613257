"""One training step's loss: the paper's ranking loss plus the auxiliary losses and the softmax against negatives
from the whole collection (:func:`collection_loss`), as the module DDP wraps.

:class:`StepLoss` scores a batch's candidates (features from :class:`DeviceTensors`, or gathered from
:class:`~training.data.LoggedPairs` on the device) and adds the single-modality auxiliary losses
(:func:`auxiliary_losses`); ``training.train`` runs it eagerly or replays it from a CUDA graph
(``training.graphed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from amc_model.model import AMC, cosine, ranking_loss
from training.data import CorpusTensors, LoggedPairs
from training.distributed import upload
from training.retrieval import score_shared

if TYPE_CHECKING:
    from training.collection import CollectionNegatives
    from training.train_config import TrainConfig


@dataclass
class DeviceTensors(CorpusTensors):
    """:class:`CorpusTensors` whose features live on ``device``; lexical features are computed on the CPU.

    ``candidates`` is ``CorpusTensors.candidates`` with the index moved to the device first.
    """

    device: torch.device = torch.device("cpu")

    @classmethod
    def of(cls, data: CorpusTensors, device: torch.device) -> CorpusTensors:
        if device.type == "cpu":
            return data
        return cls(data.reduced.to(device), data.keyword_embeddings.to(device), data.keywords, data.matcher,
                   data.text, device)

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        return upload(tensor, self.device)

    def query_text(self, texts: list[str]) -> torch.Tensor:
        return self._upload(super().query_text(texts))

    def candidates(self, texts: list[str], index: torch.Tensor, lexical: torch.Tensor | None = None):
        if lexical is None:
            index = index.cpu()
            lexical = self._upload(self.lexical(texts, index))  # (B, N, K, F), from the CPU index
        return super().candidates(texts, self._upload(index), lexical)


def auxiliary_losses(model: AMC, data: CorpusTensors, out, index: torch.Tensor, cfg: TrainConfig,
                     positives: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """The single-modality auxiliary losses for one batch (column 0 of ``index`` holds the clicked images).

    Under DDP ``index`` is this rank's share of the global batch, ``positives`` the clicked image of every
    query of the global batch and ``offset`` the position of this rank's first query in it: the contrastive
    loss then scores the local queries against all of the global batch's images, as one process does.
    """
    device = out.scores.device
    q_match = model.mtn.match_vector(out.query_embedding)  # (b, H)
    loss = out.scores.new_zeros(())
    if cfg.visual_rank_weight:
        visual_scores = cosine(q_match.unsqueeze(1), out.visual_vector)  # (b, 1 + t)
        loss = loss + cfg.visual_rank_weight * ranking_loss(visual_scores, cfg.margin)
    if cfg.language_rank_weight:
        keyword_vector = model.mtn.split(out.keyword_vector)[0]  # k^q without the tags' coherence
        language_scores = cosine(model.mtn.query_vectors(out.query_embedding)[1].unsqueeze(1), keyword_vector)
        loss = loss + cfg.language_rank_weight * ranking_loss(language_scores, cfg.margin)
    if cfg.visual_contrastive_weight:
        local = upload(index[:, 0], device)  # (b,) this rank's queries' clicked images
        positives = local if positives is None else upload(positives, device)  # (B,) the global batch's
        u = model.van.project(data.reduced[positives])  # (B images, R, H)
        visual, _ = model.van.forward_shared(out.query_embedding, u)  # (b queries, B images, H)
        similarity = cosine(q_match.unsqueeze(1), visual) / cfg.contrastive_temperature  # (b, B)
        # The same image can be two queries' positive: it is not a negative for either.
        target = torch.arange(len(local), device=device) + offset  # each query's own column
        own = torch.arange(len(positives), device=device)[None, :] == target[:, None]  # (b, B)
        same = local[:, None] == positives[None, :]
        similarity = similarity.masked_fill(same & ~own, -1e4)
        loss = loss + cfg.visual_contrastive_weight * torch.nn.functional.cross_entropy(similarity, target)
    return loss


def collection_loss(model: AMC, data: CorpusTensors, negatives: CollectionNegatives, query_text: torch.Tensor,
                    qids: np.ndarray, positives: np.ndarray, cfg: TrainConfig, offset: int = 0) -> torch.Tensor:
    """Softmax of a query's clicked image against negatives from the whole collection, all scored by the full model
    (``training.collection`` says which), for the batch's first ``cfg.collection_queries`` queries (the batch is in
    random order; the cost grows with queries x negatives): what whole-store search asks of the model.

    ``qids`` and ``positives`` are the whole (global) batch's, so that every DDP rank draws the same negatives as one
    process; ``query_text`` holds this rank's queries, from position ``offset`` of the batch on. The value is scaled
    so that DDP's average of the ranks' scaled losses (``training.train``) is the mean over the chosen queries."""
    device = query_text.device
    chosen = min(cfg.collection_queries, len(qids)) if cfg.collection_queries > 0 else len(qids)
    start, stop = offset, min(offset + len(query_text), chosen)
    if stop <= start:  # none of this rank's queries is chosen
        return query_text.new_zeros(())
    sample = negatives.sample(qids[:chosen], positives[:chosen], cfg.collection_hard, cfg.collection_random)
    shared = upload(torch.from_numpy(sample.shared), device)
    scores, _ = score_shared(model, query_text[: stop - start], data.reduced[shared], data.keyword_embeddings[shared],
                             upload(data.lexical(negatives.texts_of(qids[start:stop]), sample.shared), device))
    logits = scores.masked_fill(upload(torch.from_numpy(sample.excluded[start:stop]), device), -1e4)
    target = upload(torch.from_numpy(sample.positive_slot[start:stop]), device)
    total = torch.nn.functional.cross_entropy(logits / cfg.collection_temperature, target, reduction="sum")
    return total * len(qids) / (len(query_text) * chosen)


class StepLoss(torch.nn.Module):
    """One step's training loss as a module, the thing DistributedDataParallel wraps.

    ``forward(texts, index, positives, offset, qids, batch_qids)``: the loss of queries ``texts`` with candidate rows
    ``index`` (b, 1 + t), column 0 the clicked image; ``positives``/``offset`` as in :func:`auxiliary_losses`, and
    under DDP ``batch_qids`` the global batch's query rows (:func:`collection_loss` draws its negatives for it).
    With ``pairs`` (the training split's :class:`LoggedPairs`) and ``qids`` (the queries' rows in it, on the
    device), query embeddings and lexical features are gathered from it instead of computed.
    """

    def __init__(self, model: AMC, data: CorpusTensors, cfg: TrainConfig, pairs: LoggedPairs | None = None,
                 negatives: CollectionNegatives | None = None) -> None:
        super().__init__()
        self.model = model
        self.data = data
        self.cfg = cfg
        self.pairs = pairs
        self.negatives = negatives
        self.use_visual = cfg.mode in ("amc", "equal_fusion", "visual_only")

    def forward(self, texts: list[str] | None, index: torch.Tensor, positives: torch.Tensor | None = None,
                offset: int = 0, qids: torch.Tensor | None = None,
                batch_qids: torch.Tensor | None = None) -> torch.Tensor:
        cfg, data = self.cfg, self.data
        if self.pairs is None or qids is None:
            if texts is None:
                raise ValueError("StepLoss needs the query texts, or LoggedPairs and the queries' rows in it")
            query, lexical = data.query_text(texts), None
        else:
            query, lexical = self.pairs.gather(qids, index)
        out = self.model(query, *data.candidates(texts, index, lexical), reduced=True)
        loss = ranking_loss(out.scores, cfg.margin)
        if cfg.listwise_weight:
            loss = loss + cfg.listwise_weight * torch.nn.functional.cross_entropy(
                out.scores / cfg.listwise_temperature, torch.zeros(len(index), dtype=torch.long,
                                                                   device=out.scores.device))
        if self.use_visual:
            loss = loss + auxiliary_losses(self.model, data, out, index, cfg, positives, offset)
        if self.negatives is not None and qids is not None:
            whole = (qids, index[:, 0]) if batch_qids is None else (batch_qids, positives)  # the global batch's
            loss = loss + cfg.collection_weight * collection_loss(
                self.model, data, self.negatives, query, whole[0].cpu().numpy(), whole[1].cpu().numpy(), cfg, offset)
        return loss


def unused_parameters(step: StepLoss, texts: list[str], index: torch.Tensor) -> list[str]:
    """Trainable parameters that get no gradient from a step (baselines leave some networks out): DDP must
    be told (find_unused_parameters) or it waits for their gradients forever. One backward, grads cleared."""
    step(texts, index).backward()
    unused = [n for n, p in step.model.named_parameters() if p.requires_grad and p.grad is None]
    step.model.zero_grad(set_to_none=True)
    return unused
