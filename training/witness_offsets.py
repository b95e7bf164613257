"""The price of a stricter tags' witness (issue 21), from a trained checkpoint: its threshold ``t`` moved by each
offset (a tag match needs more kin among the image's tags to be trusted), scored on the test split's whole store,
test lists and random100, and on the validation split's whole store (where a calibration would have to pick it).

    python -m training.witness_offsets reports/seeds/seed0/runs/amc-seed0/checkpoint.pt --seed 0 --offsets 0 0.05 0.1

A one-off analysis: its figures are in reports/eval_history.md (issue 21, fourth session), with the commit that
measured them; the shipped model keeps its trained ``t``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from amc_model.checkpoint import load_checkpoint
from training import protocols
from training.corpus import load_corpus
from training.data import corpus_tensors, term_weights
from training.evaluate import learned_scores, list_metrics, tag_spam_masks
from training.train import TrainConfig


def offsets_table(checkpoint: str, seed: int, offsets: list[float]) -> list[dict]:
    corpus = load_corpus(dataclasses.replace(TrainConfig().corpus, seed=seed), progress=False)
    validation = dataclasses.replace(corpus, queries={**corpus.queries, "test": corpus.queries["val"]})
    built = protocols.build(corpus)
    lists = {"whole_store": built["whole_store"], "whole_store_val": protocols.whole_store(validation),
             "test_lists": built["test_lists"], "random100": built["random100"]}
    model = load_checkpoint(checkpoint).build_model().eval()
    data = corpus_tensors(corpus, model, term_weights(corpus))
    spam = {name: tag_spam_masks(corpus, data, lists[name]) for name in ("whole_store", "whole_store_val")}
    trained = model.mtn.tag_witness.data.clone()  # (r, t)
    rows = []
    for offset in offsets:
        model.mtn.tag_witness.data = trained + torch.tensor([0.0, offset])
        row = {"offset": offset}
        for name, chosen in lists.items():
            protocol = "whole_store" if name.startswith("whole_store") else name
            scored = learned_scores(model, data, protocol, chosen)
            metrics = list_metrics(protocol, chosen, [s["scores"] for s in scored], spam.get(name))["all"]
            row[name] = {k: round(float(v), 4) for k, v in metrics.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    offsets_table(args.checkpoint, args.seed, args.offsets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
