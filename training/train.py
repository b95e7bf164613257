"""Train AMC (or one of its baselines) with the paper's ranking loss on the image-search log.

    python -m training.train --out runs/amc --epochs 20 --corpus.max_images 300
    torchrun --nproc-per-node 2 -m training.train --device cuda ...   # DistributedDataParallel, one GPU each

Each epoch ends with validation NDCG@10; training stops early when it has not improved for ``patience``
epochs, and the best epoch's weights are saved as a checkpoint that export can use on its own.

Under torchrun (``training.distributed``) every rank draws the same global batch of ``batch_size`` queries
(same seed: the same order and the same sampled negatives as one process) and computes the loss of its
contiguous share; the ranking, listwise and contrastive losses are means over queries, so with each rank's
loss scaled by ``local / global * world``, DDP's gradient average is the gradient of the global batch's loss,
as in one process. The in-batch contrastive loss keeps all ``batch_size`` images as candidates: each rank
projects every positive of the global batch (the features are replicated on every rank), so its queries see
the same negatives as in one process. What differs is floating-point summation order only. Rank 0 alone
shows the progress bar, evaluates (the others wait for its figures, so early stopping agrees) and writes the
checkpoint, in the same format.

Besides the logged lists, each step scores its queries against negatives drawn from the whole collection
(``training.collection``: random images, and per query images whose auto-tags carry its words, the clicked image's
visual neighbours and what the model ranks first, mined every ``mine_every`` epochs), so that the model learns to
rank the clicked image above the thousands of images a whole-store search passes (``collection_weight``; 0 turns it
off and gives the loss of the logged lists alone, which the CUDA-graph replay needs).

Where the parts are: the batches from the click log in ``training.sampling``, a step's loss (the module DDP
wraps) in ``training.step``, the negatives from the whole collection in ``training.collection``, the CUDA-graph
replay of a whole step in ``training.graphed``, the configuration (:class:`TrainConfig`, every field a flag) in
``training.train_config``; this module holds the epoch loop with validation and early stopping, and the command
line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from amc_contract.text import TermWeights
from amc_model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from amc_model.model import AMC
from training.collection import CollectionNegatives
from training.config import add_dataclass_args, config_from_args
from training.corpus import Corpus, Query, load_corpus
from training.data import (
    CorpusTensors,
    LoggedPairs,
    corpus_tensors,
    fit_region_pca,
    padded_candidates,
    term_weights,
)
from training.distributed import Dist, no_buffer_sync, setup, teardown, upload
from training.graphed import GraphedStep
from training.metrics import mean_ndcg
from training.sampling import BatchSampler, batch_indices, training_pairs
from training.step import DeviceTensors, StepLoss, unused_parameters
from training.train_config import TrainConfig


@dataclass
class TrainResult:
    checkpoint: Path
    fingerprint: str
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    history: list[dict]
    seconds: float


@dataclass
class Prepared:
    """What ``train`` otherwise derives from the corpus's raw region features (benchmarks bring it packed)."""

    region_pca: tuple[torch.Tensor, torch.Tensor]  # mean (D,), basis (D, pca_dim): AMC.set_region_pca
    weights: TermWeights
    data: CorpusTensors


@torch.no_grad()
def score_lists(model: AMC, data: CorpusTensors, texts: list[str], candidate_lists: list[np.ndarray],
                batch: int = 64) -> list[dict]:
    """Scores each query text's candidate list; per query a dict of numpy arrays (scores, weights, attention)."""
    model.eval()
    results = []
    for start in range(0, len(texts), batch):
        chunk = list(texts[start:start + batch])
        lists = candidate_lists[start:start + batch]
        index = padded_candidates(lists)
        out = model(data.query_text(chunk), *data.candidates(chunk, index), reduced=True)
        for b, cands in enumerate(lists):
            n = len(cands)
            results.append({"scores": out.scores[b, :n].cpu().numpy(),
                            "modality_weights": out.modality_weights[b, :n].cpu().numpy(),
                            "region_attention": out.region_attention[b, :n].cpu().numpy(),
                            "keyword_attention": out.keyword_attention[b, :n].cpu().numpy()})
    return results


def score_queries(model: AMC, data: CorpusTensors, queries: list[Query], batch: int = 64) -> list[dict]:
    """:func:`score_lists` over the log's own candidate lists."""
    return score_lists(model, data, [q.text for q in queries], [q.candidates for q in queries], batch)


def evaluate_split(model: AMC, data: CorpusTensors, queries: list[Query]) -> dict[str, float]:
    scored = score_queries(model, data, queries)
    return mean_ndcg([s["scores"] for s in scored], [q.relevance for q in queries])


def train(cfg: TrainConfig, corpus: Corpus | None = None, *, prepared: Prepared | None = None) -> TrainResult:
    """Trains one model; under torchrun (``WORLD_SIZE`` > 1) this process is one rank of DDP training."""
    d = setup(cfg.device)
    try:
        return _train(cfg, corpus, prepared, d)
    finally:
        teardown(d)


def _train(cfg: TrainConfig, corpus: Corpus | None, prepared: Prepared | None, d: Dist) -> TrainResult:
    started = time.perf_counter()
    progress = cfg.progress and d.main
    if not d.main:
        d.barrier()  # rank 0 builds (or reads) the caches first; the others then read them
    corpus = corpus or load_corpus(cfg.corpus, progress=progress)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # the same stream on every rank: the same global batches
    model_config = cfg.model_config()
    model = AMC(model_config)
    model.mtn.start_gate_at(cfg.init_lexical_gate)
    if prepared is None:
        model.set_region_pca(*fit_region_pca(corpus.regions, cfg.pca_dim, seed=cfg.corpus.seed))
    else:
        model.set_region_pca(*prepared.region_pca)
    if cfg.resume:
        model.load_state_dict(load_checkpoint(cfg.resume, expect=model_config).state_dict)
    if prepared is None:
        weights = term_weights(corpus)
        data = corpus_tensors(corpus, model, weights, progress=progress)
    else:
        weights, data = prepared.weights, prepared.data
    train_queries, val_queries = corpus.queries["train"], corpus.queries["val"]
    pairs = training_pairs(train_queries, cfg.dwell)
    if not pairs:
        raise ValueError("the training split has no query with both a clicked and an unclicked candidate")
    train_texts = [q.text for q in train_queries]
    data.query_text(train_texts)  # embeds (and caches) every training query once, before the progress bar
    if d.main:
        d.barrier()
    model.to(d.device)
    pairs_table = None
    if cfg.precompute_lexical:
        pairs_table = LoggedPairs(data, train_texts, [q.candidates for q in train_queries], d.device,
                                  progress=progress)
    data = DeviceTensors.of(data, d.device)
    negatives = CollectionNegatives(corpus, data, train_queries, seed=cfg.seed) if cfg.collection_weight else None
    step_loss = StepLoss(model, data, cfg, pairs_table, negatives)
    ddp, unused = None, []
    if d.enabled:
        probe = batch_indices(pairs[:2], np.random.default_rng(0), cfg.negatives)  # its own rng: rng untouched
        unused = unused_parameters(step_loss, [train_texts[i] for i in probe[0]], probe[1])
    # Graphs where they are valid (training.graphed): fixed-shape batches, no CPU features, and under DDP no
    # parameter left without a gradient (find_unused_parameters walks the autograd graph in Python each step).
    graphed = (cfg.cuda_graph and d.device.type == "cuda" and pairs_table is not None and not unused
               and len(pairs) >= cfg.batch_size and negatives is None  # the collection loss samples on the CPU
               and not cfg.ema_decay)  # the average is updated on the current stream, not the graph's
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, capturable=graphed)

    def global_loss(texts: list[str] | None, rows: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        """The loss whose gradient (averaged over ranks by DDP) is the global batch's: this rank's share."""
        if ddp is None:
            return step_loss(texts, index, qids=rows)
        start, stop = d.shard(len(index))
        scale = (stop - start) * d.world / len(index)
        if stop == start:  # a last batch smaller than the world: a weightless query keeps DDP in step
            start, stop, scale = 0, 1, 0.0
        return ddp(None if texts is None else texts[start:stop], index[start:stop], index[:, 0], start,
                   None if rows is None else rows[start:stop], rows) * scale

    graph_step = GraphedStep(lambda rows, index: global_loss(None, rows, index), optimizer, d.device) \
        if graphed else None
    if d.enabled:
        if graph_step is not None:  # DDP broadcasts the weights on the graph's stream: after they are in place
            graph_step.stream.wait_stream(torch.cuda.current_stream(d.device))
        with torch.cuda.stream(graph_step.stream) if graph_step else contextlib.nullcontext():
            ddp = torch.nn.parallel.DistributedDataParallel(
                step_loss, device_ids=None,  # inputs stay where they are: CPU features need the CPU index
                find_unused_parameters=bool(unused), **no_buffer_sync())

    if cfg.sampling not in ("sequential", "vectorized"):
        raise ValueError(f"--sampling must be sequential or vectorized, got {cfg.sampling!r}")
    sampler = BatchSampler(pairs, cfg.negatives) if cfg.sampling == "vectorized" else None

    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    best, best_state, best_epoch, stale, history = -1.0, None, 0, 0, []
    averaged = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"train {cfg.mode}", unit="step",
               disable=not progress, file=sys.stderr)
    for epoch in range(1, cfg.epochs + 1):
        if negatives is not None and cfg.mine_every and epoch > 1 and (epoch - 1) % cfg.mine_every == 0:
            negatives.mine(model, cfg.mine_queries or None)
        model.train()
        order = rng.permutation(len(pairs))
        losses, shown = [], []
        epoch_started = time.perf_counter()
        for step in range(steps_per_epoch):
            batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if graph_step is not None and len(batch) < cfg.batch_size:
                batch = order[-cfg.batch_size:]  # a graph replays one shape (TrainConfig.cuda_graph)
            if sampler is None:
                qids, index = batch_indices([pairs[i] for i in batch], rng, cfg.negatives)  # the global batch
            else:
                qids, index = sampler(batch, rng)
            if graph_step is not None:
                loss = graph_step(torch.as_tensor(qids), index)
            else:
                texts, rows = [train_texts[i] for i in qids], torch.as_tensor(qids)
                if pairs_table is not None:  # the step's indices go to the device once; features are gathered there
                    rows, index = upload(torch.as_tensor(qids), d.device), upload(index, d.device)
                loss = global_loss(texts, rows, index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if averaged is not None:  # after the optimizer's step (no graph replays while averaging: `graphed`)
                averaged.update()
            losses.append(loss.detach())
            bar.update(1)
            if progress and (step % 20 == 0 or step == steps_per_epoch - 1):  # .item() waits for the GPU
                shown.append(loss.item())
                bar.set_postfix(epoch=epoch, loss=f"{np.mean(shown):.4f}", best_val=f"{best:.4f}")
        if ddp is None:
            epoch_loss = float(np.mean(torch.stack(losses).tolist()))
        else:  # the global batch's loss is the mean over ranks of the scaled local losses
            epoch_loss = d.all_reduce_sum(torch.stack(losses).sum()).item() / d.world / len(losses)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        train_s = time.perf_counter() - epoch_started
        # Validated (and kept) are the averaged weights where there are some (TrainConfig.ema_decay).
        with averaged.swapped_in() if averaged is not None else contextlib.nullcontext():
            val = d.broadcast(evaluate_split(model, data, val_queries) if d.main else None)
            score = (val["ndcg@1"] + val["ndcg@10"]) / 2 if cfg.select_by == "ndcg@1+10" else val[cfg.select_by]
            if score > best:
                best, best_epoch, stale = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
        history.append({"epoch": epoch, "loss": epoch_loss, **{f"val_{k}": v for k, v in val.items()},
                        "train_s": train_s, "samples": len(pairs)})
        if stale and stale >= cfg.patience:  # an improving epoch never stops training, whatever the patience
            break
    bar.close()
    model.load_state_dict(best_state)
    out_dir = Path(cfg.out)
    summary = None
    if d.main:
        val = evaluate_split(model, data, val_queries)
        test = evaluate_split(model, data, corpus.queries["test"])
        metrics = {"best_epoch": best_epoch, **{f"val_{k}": v for k, v in val.items()},
                   **{f"test_{k}": v for k, v in test.items()}}
        ckpt = save_checkpoint(out_dir / "checkpoint.pt", model, weights.to_json(), train_config=asdict(cfg),
                               metrics=metrics)
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
        summary = (ckpt.fingerprint, val, test)
    fingerprint, val, test = d.broadcast(summary)  # every rank returns the same result, once it is written
    return TrainResult(out_dir / "checkpoint.pt", fingerprint, best_epoch, val, test, history,
                       time.perf_counter() - started)


class WeightAverage:
    """An exponential moving average of a model's trainable weights (``TrainConfig.ema_decay``)."""

    def __init__(self, model: AMC, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in the model for the block's duration, the trained ones back after it."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.average, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained, strict=True):
                    p.copy_(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_args(parser, TrainConfig)
    try:
        cfg = config_from_args(TrainConfig, parser.parse_args(argv))
        result = train(cfg)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        print(f"checkpoint {result.checkpoint} (fingerprint {result.fingerprint}), best epoch {result.best_epoch}, "
              f"val NDCG@10 {result.val['ndcg@10']:.4f}, test NDCG@10 {result.test['ndcg@10']:.4f}, "
              f"{result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
