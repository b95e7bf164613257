"""DDP scaling benchmark (issue 11): samples/s and validation NDCG@10 on 1 and 2 GPUs under torchrun.

Here (needs the corpus cache; the GPU machine has neither the emoji font nor CLDR nor the sentence encoder):

    python -m benchmarks.ddp pack --sessions 8 --out .cache/ddp/pack.npz

There (``run`` carries ``.cache/ddp``; ``benchmarks/ddp.sh`` runs all of it and writes $OUT/ddp.json):

    torchrun --nproc-per-node 2 -m benchmarks.ddp train --pack .cache/ddp/pack.npz --out runs/ddp2 \
        --device cuda --batch_size 512 --epochs 6

The training set: the full corpus (every colour emoji, 3,635 images) whose click log is enlarged to
``--sessions`` simulated search sessions per training query (``CorpusConfig.log_sessions``: each session a fresh
candidate list, clicks and dwell; validation and test keep their one session). ``--sessions 8`` gives ~26k training
queries instead of 13,108 (the default 4 sessions; 3,277 with one). The corpus code renders one image per emoji, and extra renderings' region features
would not fit in what travels to the GPU machine (64 MiB), so the enlargement is of the log, not the images.

What travels (``pack``): the PCA-reduced region features (the model's own ``fit_region_pca`` on the corpus),
quantized to int8 per component (scale = max |x| / 127; 45 MB instead of 91 MB as float16), the region PCA
itself (so checkpoints are complete), the keyword table and query texts' MiniLM embeddings (float16), the
term weights and the log. Both the 1- and 2-GPU runs read the same pack, so the quantization cannot favour one.

``train`` calls ``training.train.train`` with that data (``Prepared``): the same code path as
``torchrun -m training.train``. A sample is one training query (its clicked image and ``negatives`` unclicked
ones); samples/s = training queries / seconds of training steps, over epochs 2.. (epoch 1 warms up), evaluation
excluded (``history.json``'s ``train_s``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("amc_contract") is None:
    # The GPU machine has no amc-client install (nor grpc/tritonclient): the contract needs numpy alone, so it is
    # read from the checkout.
    sys.path.insert(0, str(ROOT / "client"))

import torch  # noqa: E402

from amc_contract.text import LexicalMatcher, TermWeights  # noqa: E402
from amc_model.text_encoder import TextEmbeddings  # noqa: E402
from training.corpus import SPLITS, Corpus, CorpusConfig, Query  # noqa: E402
from training.data import CorpusTensors  # noqa: E402


def pack(out: Path, sessions: int, cache_dir: str) -> None:
    from amc_contract.text import padded_keywords
    from amc_model.model import AMC
    from training.corpus import load_corpus
    from training.data import corpus_tensors, fit_region_pca, term_weights
    from training.train_config import TrainConfig

    cfg = TrainConfig(corpus=CorpusConfig(cache_dir=cache_dir, log_sessions=sessions))
    corpus = load_corpus(cfg.corpus, progress=True)
    model = AMC(cfg.model_config())
    mean, basis = fit_region_pca(corpus.regions, cfg.pca_dim, seed=cfg.corpus.seed)
    model.set_region_pca(mean, basis)
    weights = term_weights(corpus)
    data = corpus_tensors(corpus, model, weights, progress=True)
    reduced = data.reduced.numpy()  # (images, R, P) float32
    scale = np.abs(reduced).reshape(-1, reduced.shape[-1]).max(0) / 127.0  # (P,)
    quantized = np.clip(np.rint(reduced / scale), -127, 127).astype(np.int8)
    error = np.linalg.norm(quantized * scale - reduced) / np.linalg.norm(reduced)
    print(f"[pack] reduced regions {reduced.shape}, int8 relative error {error:.2e}", flush=True)

    queries = corpus.queries
    print("[pack] queries: " + ", ".join(f"{s} {len(queries[s])}" for s in SPLITS), flush=True)

    keywords = padded_keywords(corpus.keywords)
    table = sorted({k for k in keywords.reshape(-1) if k})
    slot = {k: i + 1 for i, k in enumerate(table)}  # 0: padding
    texts = sorted({q.text for qs in queries.values() for q in qs})
    arrays = {
        "reduced": quantized,
        "scale": scale.astype(np.float32),
        "region_mean": mean.numpy(),
        "region_basis": basis.numpy(),
        "keyword_table": np.array(table, dtype=str),
        "keyword_vectors": data.text.get(table, "keyword").astype(np.float16),
        "keywords": np.array([[slot.get(k, 0) for k in row] for row in keywords], dtype=np.int16),
        "texts": np.array(texts, dtype=str),
        "text_vectors": data.text.get(texts, "query").astype(np.float16),
        "meta": np.array(
            json.dumps(
                {
                    "term_weights": weights.to_json(),
                    "chars": corpus.chars,
                    "names": corpus.names,
                    "sessions": sessions,
                    "corpus": {"seed": corpus.config.seed},
                }
            )
        ),
    }
    row = {t: i for i, t in enumerate(texts)}
    for split, qs in queries.items():
        assert len({len(q.candidates) for q in qs}) == 1, "candidate lists of one length"
        arrays[f"{split}_text"] = np.array([row[q.text] for q in qs], dtype=np.int32)
        arrays[f"{split}_kind"] = np.array([q.kind == "name" for q in qs])
        arrays[f"{split}_target"] = np.array([q.target for q in qs], dtype=str)
        arrays[f"{split}_candidates"] = np.stack([q.candidates for q in qs]).astype(np.int16)
        arrays[f"{split}_relevance"] = np.stack([q.relevance for q in qs]).astype(np.int8)
        arrays[f"{split}_clicks"] = np.stack([q.clicks for q in qs])
        arrays[f"{split}_satisfied"] = np.stack([q.satisfied for q in qs])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"[pack] wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", flush=True)


def unpack(path: Path):
    """The pack as (Corpus, Prepared) for ``training.train.train``."""
    from training.train import Prepared

    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    texts = z["texts"].tolist()
    queries = {}
    for split in SPLITS:
        queries[split] = [
            Query(
                texts[t],
                "name" if name else "keyword",
                str(target),
                cands.astype(np.int64),
                rel.astype(np.int64),
                clicks,
                satisfied,
            )
            for t, name, target, cands, rel, clicks, satisfied in zip(
                z[f"{split}_text"],
                z[f"{split}_kind"],
                z[f"{split}_target"],
                z[f"{split}_candidates"],
                z[f"{split}_relevance"],
                z[f"{split}_clicks"],
                z[f"{split}_satisfied"],
                strict=True,
            )
        ]
    table = ["", *z["keyword_table"].tolist()]
    keywords = np.array(table, dtype=object)[z["keywords"]]  # (images, K), '' pads
    vectors = np.concatenate(
        [np.zeros((1, z["keyword_vectors"].shape[1]), np.float32), z["keyword_vectors"].astype(np.float32)]
    )
    keyword_embeddings = torch.from_numpy(vectors[z["keywords"]])  # (images, K, E), zero pads
    reduced = torch.from_numpy(z["reduced"].astype(np.float32) * z["scale"])  # (images, R, P)
    # Every text this run embeds is in the pack: the table is filled, the encoder is never loaded.
    text = TextEmbeddings(ROOT / ".cache" / "ddp-unused")
    text._tables = {
        "query": dict(zip(texts, z["text_vectors"].astype(np.float32), strict=True)),
        "keyword": dict(zip(table[1:], vectors[1:], strict=True)),
    }
    weights = TermWeights.from_json(meta["term_weights"])
    n = len(meta["chars"])
    corpus = Corpus(
        config=CorpusConfig(seed=meta["corpus"]["seed"]),
        chars=meta["chars"],
        names=meta["names"],
        true_keywords=[[] for _ in range(n)],
        keywords=[[k for k in row if k] for row in keywords],
        noisy=np.zeros(n, dtype=bool),
        regions=np.zeros((n, 0, 0), np.float16),
        queries=queries,
    )
    data = CorpusTensors(reduced, keyword_embeddings, keywords, LexicalMatcher(weights), text)
    region_pca = (torch.from_numpy(z["region_mean"]), torch.from_numpy(z["region_basis"]))
    return corpus, Prepared(region_pca, weights, data)


def cpu_breakdown(corpus: Corpus, prepared, cfg, repeats: int = 10) -> dict[str, float]:
    """Milliseconds of the CPU work of one step on this machine: drawing the global batch (every rank does
    it), and the lexical features of the whole batch and of half of it (each rank does its share)."""
    from training.sampling import BatchSampler, batch_indices, training_pairs

    pairs = training_pairs(corpus.queries["train"], cfg.dwell)
    texts = [q.text for q in corpus.queries["train"]]
    rng = np.random.default_rng(123)
    batch = rng.permutation(len(pairs))[: cfg.batch_size]
    sampler = BatchSampler(pairs, cfg.negatives)

    def ms(f) -> float:
        f()
        t = time.perf_counter()
        for _ in range(repeats):
            f()
        return (time.perf_counter() - t) / repeats * 1e3

    qids, index = batch_indices([pairs[i] for i in batch], rng, cfg.negatives)
    chosen = [texts[i] for i in qids]
    half = len(chosen) // 2
    return {
        "draw_sequential": ms(lambda: batch_indices([pairs[i] for i in batch], rng, cfg.negatives)),
        "draw_vectorized": ms(lambda: sampler(batch, rng)),
        "lexical_batch": ms(lambda: prepared.data.lexical(chosen, index)),
        "lexical_half": ms(lambda: prepared.data.lexical(chosen[:half], index[:half])),
    }


def run_train(args: argparse.Namespace) -> None:
    from training.train import train
    from training.train_config import TrainConfig

    started = time.perf_counter()
    corpus, prepared = unpack(Path(args.pack))
    loaded = time.perf_counter() - started
    cfg = TrainConfig(
        out=args.out,
        seed=args.seed,
        epochs=args.epochs,
        patience=args.epochs + 1,
        batch_size=args.batch_size,
        device=args.device,
        progress=False,
        sampling=args.sampling,
        precompute_lexical=args.lexical == "precomputed",
        cuda_graph=args.graph == "on",
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_ms = cpu_breakdown(corpus, prepared, cfg) if world == 1 else None
    result = train(cfg, corpus, prepared=prepared)

    if int(os.environ.get("RANK", "0")) == 0:
        timed = result.history[1:] or result.history
        samples = sum(h["samples"] for h in timed)
        seconds = sum(h["train_s"] for h in timed)
        summary = {
            "world": int(os.environ.get("WORLD_SIZE", "1")),
            "seed": args.seed,
            "batch_size": args.batch_size,
            "epochs": len(result.history),
            "train_queries": result.history[0]["samples"],
            "samples_per_s": samples / seconds,
            "epoch_train_s": [h["train_s"] for h in result.history],
            "val_ndcg@10": result.val["ndcg@10"],
            "test_ndcg@10": result.test["ndcg@10"],
            "best_epoch": result.best_epoch,
            "loss": [h["loss"] for h in result.history],
            "val_ndcg@10_by_epoch": [h["val_ndcg@10"] for h in result.history],
            "pack_load_s": loaded,
            "total_s": time.perf_counter() - started,
            "sampling": args.sampling,
            "lexical": args.lexical,
            "cuda_graph": args.graph,
            "cpu_ms_per_step": cpu_ms,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }
        Path(args.out, "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            json.dumps(
                {
                    k: summary[k]
                    for k in (
                        "world",
                        "seed",
                        "batch_size",
                        "sampling",
                        "lexical",
                        "cuda_graph",
                        "samples_per_s",
                        "val_ndcg@10",
                        "best_epoch",
                        "cpu_ms_per_step",
                    )
                }
            ),
            flush=True,
        )


def report(args: argparse.Namespace) -> None:
    """ddp.json and ddp_details.json under ``--out`` from the runs' summaries.

    Two runs (seed 0 and seed 1), each 1 GPU then 2 GPUs at ``--batch_size``; ddp.json's figures are their
    means, ddp_details.json holds each run, the seed-to-seed spread and the small-batch pair.
    """
    runs = [json.loads(Path(p, "summary.json").read_text()) for p in args.runs]

    def pick(seed: int, world: int, batch: int) -> dict:
        return next(r for r in runs if (r["seed"], r["world"], r["batch_size"]) == (seed, world, batch))

    pairs = {}
    for seed in sorted({r["seed"] for r in runs if r["batch_size"] == args.batch_size}):
        one, two = pick(seed, 1, args.batch_size), pick(seed, 2, args.batch_size)
        pairs[f"seed{seed}"] = {
            "samples_per_s": [one["samples_per_s"], two["samples_per_s"]],
            "scaling": two["samples_per_s"] / (2 * one["samples_per_s"]),
            "val_ndcg@10": [one["val_ndcg@10"], two["val_ndcg@10"]],
        }
    mean = np.mean([p["samples_per_s"] for p in pairs.values()], axis=0).tolist()
    ndcg = np.array([p["val_ndcg@10"] for p in pairs.values()])  # (runs, gpus)
    gpus = Path(args.out, "gpus.csv")
    names = [line.split(",")[0].strip() for line in gpus.read_text().splitlines()] if gpus.exists() else []
    machine = (f"{len(names)}x {names[0]}, " if names else "") + f"torch {torch.__version__}"
    headline = {
        "gpus": [1, 2],
        "samples_per_s": [round(x, 1) for x in mean],
        "scaling": round(mean[1] / (2 * mean[0]), 4),
        "val_ndcg@10": [round(float(x), 4) for x in ndcg.mean(0)],
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
    }
    details = {
        "headline": "means of the runs below (one per seed), each 1 GPU then 2 GPUs",
        "batch_size": args.batch_size,
        "by_seed": pairs,
        "seed_spread_val_ndcg@10_1gpu": float(np.ptp(ndcg[:, 0])),
        "gpu_difference_val_ndcg@10": (ndcg[:, 1] - ndcg[:, 0]).tolist(),
        "runs": runs,
    }
    small = [r for r in runs if r["batch_size"] != args.batch_size]
    if small:
        one, two = (next(r for r in small if r["world"] == w) for w in (1, 2))
        details["small_batch"] = {
            "batch_size": one["batch_size"],
            "samples_per_s": [one["samples_per_s"], two["samples_per_s"]],
            "scaling": two["samples_per_s"] / (2 * one["samples_per_s"]),
        }
    Path(args.out, "ddp.json").write_text(json.dumps(headline, indent=2) + "\n")
    Path(args.out, "ddp_details.json").write_text(json.dumps(details, indent=2) + "\n")
    for name, r in pairs.items():
        print(
            f"{name}: samples/s {r['samples_per_s'][0]:.0f} / {r['samples_per_s'][1]:.0f} "
            f"scaling {r['scaling']:.3f} val NDCG@10 {r['val_ndcg@10'][0]:.4f} / {r['val_ndcg@10'][1]:.4f}"
        )
    if small:
        s = details["small_batch"]
        print(
            f"batch {s['batch_size']}: samples/s {s['samples_per_s'][0]:.0f} / {s['samples_per_s'][1]:.0f} "
            f"scaling {s['scaling']:.3f}"
        )
    print(json.dumps(headline))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ddp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the packed training set (here, from the corpus cache)")
    p.add_argument("--out", default=".cache/ddp/pack.npz")
    p.add_argument("--sessions", type=int, default=8, help="simulated sessions per training query")
    p.add_argument("--cache-dir", default=".cache/amc")
    t = sub.add_parser("train", help="one training run on the pack (under torchrun)")
    t.add_argument("--pack", default=".cache/ddp/pack.npz")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--batch_size", type=int, default=512)
    t.add_argument("--device", default="cuda")
    t.add_argument("--sampling", default="sequential", choices=["sequential", "vectorized"])
    t.add_argument("--lexical", default="precomputed", choices=["precomputed", "per_step"],
                   help="TrainConfig.precompute_lexical: the features of every logged pair once, or each step's")
    t.add_argument("--graph", default="on", choices=["on", "off"], help="TrainConfig.cuda_graph")
    r = sub.add_parser("report", help="ddp.json details from the runs' summary.json files")
    r.add_argument("runs", nargs="+")
    r.add_argument("--batch_size", type=int, default=512)
    r.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(Path(args.out), args.sessions, args.cache_dir)
    elif args.command == "train":
        run_train(args)
    else:
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
