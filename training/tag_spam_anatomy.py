"""Why tag spam still comes first for some whole-store queries (issue 21), from a trained checkpoint.

    python -m training.tag_spam_anatomy reports/runs/amc-seed0/checkpoint.pt --seed 0 [--offsets 0 -0.5 -1 -2]

1. Each query whose first result is tag spam (a grade-0 image carrying the query's words among its auto-tags), put
   in one of two kinds: *no relevant image carries the words* (the target's own tags miss them: only the picture can
   find it) or *a relevant image carries them too* (both have the exact match; the picture should have decided). For
   the named queries it also counts those whose target's picture matches the query less than the spam's does
   (``cos(q', v^q)``, MTN's visual match), where no trust that depends on the picture can put the target first.
2. The price of distrusting tags more: the agreement's bias ``b`` moved by each offset (the sign of the trust flips at
   a higher picture match), scored on whole_store, test_lists and random100.

A one-off analysis: its figures are in reports/eval_history.md (issue 21), with the commit that measured them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch
import torch.nn.functional as F

from training import protocols
from training.checkpoint import load_checkpoint
from training.corpus import load_corpus
from training.data import corpus_tensors, term_weights
from training.evaluate import learned_scores, list_metrics, tag_spam_masks
from training.retrieval import CollectionScorer
from training.train import TrainConfig


def visual_match(scorer: CollectionScorer, texts: list[str]) -> np.ndarray:
    """MTN's visual match cos(q', v^q) of each query against every image (Q, G)."""
    model, data, out = scorer.model, scorer.data, []
    with torch.no_grad():
        for start in range(0, len(texts), 8):
            q = model.qen(data.query_text(texts[start:start + 8]))
            visual, _ = model.van.forward_shared(q, scorer.u, scorer.tanh_u)
            guide, _ = model.mtn.query_vectors(q)
            if model.mtn.lexical is not None:
                visual = F.pad(visual, (0, 1))
            out.append(F.cosine_similarity(guide[:, None], visual, dim=-1).numpy())
    return np.concatenate(out)


def anatomy(checkpoint: str, seed: int, offsets: list[float]) -> dict:
    corpus = load_corpus(dataclasses.replace(TrainConfig().corpus, seed=seed), progress=False)
    evaluation = protocols.build(corpus)
    model = load_checkpoint(checkpoint).build_model().eval()
    data = corpus_tensors(corpus, model, term_weights(corpus))
    lists = evaluation["whole_store"]
    spam = tag_spam_masks(corpus, data, lists)
    scorer = CollectionScorer(model, data)
    scores = scorer.scores([rl.text for rl in lists])
    match = visual_match(scorer, [rl.text for rl in lists])
    kinds = {"named, no relevant image carries the words": 0, "named, a relevant image carries them": 0,
             "keyword, no relevant image carries the words": 0, "keyword, a relevant image carries them": 0}
    target_looks_worse = named = 0
    for rl, s, m, carries in zip(lists, scores, match, spam, strict=True):
        order = rl.candidates  # list position -> image
        top = int(np.argmax(s[order]))
        if rl.relevance[top] > 0 or not carries[top]:
            continue
        relevant_carrier = bool((carries & (rl.relevance > 0)).any())
        kind = "named" if rl.target is not None else "keyword"
        kinds[f"{kind}, {'a relevant image carries them' if relevant_carrier else 'no relevant image carries the words'}"] += 1
        if rl.target is not None:
            named += 1
            target_looks_worse += bool(m[order[rl.target]] < m[order[top]])
    out = {"checkpoint": checkpoint, "seed": seed, "queries": len(lists), "tag_spam_first": sum(kinds.values()),
           "kinds": kinds, "named_target_picture_matches_less": f"{target_looks_worse} of {named}",
           "agreement": model.mtn.agreement.tolist() if model.mtn.agreement is not None else None, "offsets": []}
    if model.mtn.agreement is None:
        return out
    start = model.mtn.agreement.detach().clone()
    for offset in offsets:
        with torch.no_grad():
            model.mtn.agreement[1] = start[1] + offset
        row = {"bias_offset": offset}
        for name in ("whole_store", "test_lists", "random100"):
            scored = learned_scores(model, data, name, evaluation[name])
            metrics = list_metrics(name, evaluation[name], [x["scores"] for x in scored], spam)["all"]
            keep = ("r@1", "r@10", "ndcg@10", "tag_spam_top1_rate") if name == "whole_store" else ("ndcg@10", "r@1")
            row[name] = {k: round(v, 4) for k, v in metrics.items() if k in keep}
        out["offsets"].append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.tag_spam_anatomy", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="the corpus seed the checkpoint was trained on")
    parser.add_argument("--offsets", type=float, nargs="*", default=[0.0, -0.5, -1.0, -2.0])
    args = parser.parse_args(argv)
    print(json.dumps(anatomy(args.checkpoint, args.seed, args.offsets), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
