"""Whole-store search latency on the CPU: ``AMCClient.search`` against ``amc_search`` in a real tritonserver,
concurrency 1 (the second half of ``make bench``).

    python -m benchmarks.search --device cpu [--out reports/search_cpu.json]        (the corpus: every image)

(On a GPU, whole-store search is measured by ``bash benchmarks/gpu.sh``: ``benchmarks.search_gpu``, which lays out
its repositories with this module's :func:`gallery_store` and :func:`add_search`. This module's own GPU mode left
the tree: ``git show 132d596:benchmarks/search.py``.)

Publishes the checkpoint into a temp repository with a candidate store and only the search path (the one search step,
``amc_search_step``; ``export.repository.search_ensemble_config``), starts tritonserver, checks
the served top-k scores against PyTorch's scores of every stored image, then times sequential searches (one
client, top_k 10, queries drawn from the gallery's) and reads Triton's per-step statistics over the timed ones.

Store: the real corpus on the CPU (``--store-size 0``); a larger ``--store-size`` repeats the projected rows of a
``--gallery-size`` gallery (``export.store.Store.tiled``: the per-row cost is that of distinct images; ids are
distinct), optionally held in float16 (``--projected-dtype``; the graph computes in float32 after the gather):
100,000 rows in float32 would not fit ONNX's 2 GB protobuf limit. The results are appended to ``--out`` (a JSON
object with a list ``runs``), so two runs on separately started machines sit side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from amc_contract import signatures as sig

from . import triton
from .workloads import Gallery, collection_words, corpus_gallery, synthetic_gallery

SEARCH_MODELS = [sig.SEARCH_STEP.model_name, sig.SEARCH_ENSEMBLE_NAME]


def log(msg: str) -> None:
    print(f"[search {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(workdir: Path, checkpoint: Path, gallery: Gallery, size: int, dtype: str, *, settings=None):
    """A repository serving ``amc_search`` over the store; returns (repository, version, store, ckpt)."""
    from amc_model.checkpoint import load_checkpoint
    from export.publish import publish

    repo = workdir / "repository"
    keywords = sorted({k for kws in gallery.keywords for k in kws if k})
    version = publish(checkpoint, repo, flavour="python", keywords=keywords, log=log)
    ckpt = load_checkpoint(checkpoint)
    store = gallery_store(ckpt, gallery, repo / sig.TOKENIZER.model_name / str(version), size, dtype)
    add_search(repo, version, ckpt, store, repo / sig.TOKENIZER.model_name / str(version), settings=settings)
    return repo, version, store, ckpt


def gallery_store(ckpt, gallery: Gallery, text_dir: Path, size: int, dtype: str):
    """The gallery's candidate store (keywords embedded from the version's keyword table), repeated to ``size`` rows
    and its projections held as ``dtype`` where asked (``Store.tiled``)."""
    from export.store import build_store, keyword_table_embed

    t0 = time.perf_counter()
    model = ckpt.build_model().eval()
    store = build_store(model, gallery.regions, gallery.keywords, embed=keyword_table_embed(text_dir / "keyword_table.npz"))
    if size > len(store) or dtype != "float32":
        store = store.tiled(max(size, len(store)), projected_dtype=dtype)
    log(f"store of {len(store)} rows ({len(gallery)} distinct images, projections {dtype}) in "
        f"{time.perf_counter() - t0:.0f} s")
    return store


def add_search(repo: Path, version: int, ckpt, store, text_dir: Path, *, settings=None) -> Path:
    """Lay out ``amc_search`` over ``store`` in ``repo`` as a publish does (``export.repository``): the search step's
    version folder (the text step files of ``text_dir``, ``store.json``, the search graph exported here) with its
    config (``settings``: a ``SearchSettings``, default this machine's kind's) and the ensembles. Returns the
    step's version folder."""
    from amc_contract.text import LexicalMatcher, TermWeights
    from export.repository import (
        SEARCH_GRAPH_FILE,
        SEARCH_SETTINGS,
        TextStepFiles,
        device_kind,
        search_ensemble_config,
        search_step_config,
        to_text,
        write_atomic,
        write_text_step,
    )
    from export.store import StoreText, export_search_graph

    model = ckpt.build_model().eval()
    matcher = LexicalMatcher(TermWeights.from_json(ckpt.term_weights))
    text = StoreText.of(store, matcher.weights)
    step_dir = repo / sig.SEARCH_STEP.model_name / str(version)
    write_text_step(step_dir, version=version, files=TextStepFiles.of_version(text_dir), store_json=store.manifest(version),
                    encoder=False)
    t0 = time.perf_counter()
    export_search_graph(model, store, matcher, step_dir, version=version, fingerprint=ckpt.fingerprint, text=text)
    log(f"{SEARCH_GRAPH_FILE} exported in {time.perf_counter() - t0:.0f} s "
        f"({(step_dir / SEARCH_GRAPH_FILE).stat().st_size / 2**20:.0f} MiB)")
    write_atomic(repo / sig.SEARCH_STEP.model_name / "config.pbtxt",
                 to_text(search_step_config(settings or SEARCH_SETTINGS[device_kind()])))
    for name in (sig.SEARCH_ENSEMBLE_NAME, sig.versioned_search_ensemble_name(version)):
        write_atomic(repo / name / "config.pbtxt", to_text(search_ensemble_config(name, version)))
        (repo / name / "1").mkdir(exist_ok=True)
    return step_dir


def reference_scores(ckpt, gallery: Gallery, store, query: str, rows: np.ndarray, chunk: int = 512) -> np.ndarray:
    """PyTorch's scores (the raw path, fp32: ``amc_model.model.AMC`` on the gallery's region features) of the images
    behind store ``rows`` for ``query``; keyword embeddings are the store's (the PyTorch encoder's, from publish)."""
    import torch

    from export.reference import Reference

    reference = reference_scores.__dict__.setdefault("model", Reference(ckpt))
    query = reference.queries([query])[0]  # as the served text step reads it (the checkpoint's text rules)
    query_text = torch.from_numpy(reference.encoder.encode([query]))
    images = np.unique(rows)  # store rows below len(gallery) are the gallery's images, in order
    scores = np.empty(len(gallery), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk]
            regions = torch.from_numpy(np.asarray(gallery.regions[part], dtype=np.float32))[None]
            lexical = reference.matcher.features(query, store.keywords[part])[None]
            out = reference.model(query_text, regions, torch.ones(regions.shape[:3], dtype=torch.bool),
                                  torch.from_numpy(store.keyword_embeddings[part])[None], torch.from_numpy(lexical))
            scores[part] = out.scores[0].numpy()
    return scores[rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu",), default="cpu",
                        help="the CPU only (whole-store search on a GPU: bash benchmarks/gpu.sh)")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/amc/checkpoint.pt"))
    parser.add_argument("--store-size", type=int, default=0, help="rows (0: the corpus, one row per image)")
    parser.add_argument("--gallery-size", type=int, default=2000, help="distinct synthetic images (--store-size)")
    parser.add_argument("--projected-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--requests", type=int, default=100, help="timed searches")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--check-queries", type=int, default=3, help="queries checked against PyTorch")
    parser.add_argument("--out", type=Path, default=Path("reports/search_cpu.json"))
    args = parser.parse_args(argv)
    from amc_client import AMCClient
    from serving.server import TritonServer

    started = time.perf_counter()
    if args.store_size:
        gallery = synthetic_gallery(collection_words(args.checkpoint), size=args.gallery_size)
    else:
        gallery = corpus_gallery()
    with tempfile.TemporaryDirectory(prefix="amc-search-") as tmp:
        repo, version, store, ckpt = build(Path(tmp), args.checkpoint, gallery, args.store_size, args.projected_dtype)
        built_s = time.perf_counter() - started
        with TritonServer(repo, models=SEARCH_MODELS, log_file=Path(tmp) / "tritonserver.log") as server, \
                AMCClient(server.grpc_url, timeout_s=120) as client:
            triton.wait_models(server.grpc_url, SEARCH_MODELS)
            log(f"tritonserver ready with {len(store)} stored rows ({built_s:.0f} s after start)")
            queries = gallery.queries
            parity = []
            rows = np.arange(len(store)) % len(gallery)
            for query in queries[: args.check_queries]:
                found = client.search(query, top_k=args.top_k)
                expected = np.sort(reference_scores(ckpt, gallery, store, query, rows))[::-1][: args.top_k]
                got = np.array([r.score for r in found])
                err = float(np.abs(got - expected).max() / np.abs(expected).max())
                parity.append({"query": query, "max_relative_error": err})
            tolerance = 1e-4 if args.projected_dtype == "float32" else 1e-3
            worst = max(p["max_relative_error"] for p in parity)
            log(f"served top-{args.top_k} scores vs PyTorch over the whole store: worst relative error {worst:.1e}")
            for query in queries[:5]:  # warm-up (first-use allocations, CUDA kernels)
                client.search(query, top_k=args.top_k)
            before = triton.snapshot(server.grpc_url)
            latencies = []
            for i in range(args.requests):
                t0 = time.perf_counter()
                client.search(queries[i % len(queries)], top_k=args.top_k)
                latencies.append((time.perf_counter() - t0) * 1e3)
            steps = triton.breakdown(before, triton.snapshot(server.grpc_url))
        providers = [line.split("] ", 1)[-1].strip() for line in
                     (Path(tmp) / "tritonserver.log").read_text(errors="replace").splitlines()
                     if "ExecutionProvider" in line]
    ms = np.array(latencies)
    run = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.node(),
        "device": args.device,
        "store_rows": len(store), "distinct_images": len(gallery), "gallery": gallery.source,
        "projected_dtype": args.projected_dtype, "top_k": args.top_k, "concurrency": 1, "requests": len(ms),
        "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "max_ms": float(ms.max()),
        "rows_per_s": float(len(store) / (ms.mean() / 1e3)),
        "parity": {"tolerance": tolerance, "worst_relative_error": worst, "holds": worst < tolerance,
                   "queries": parity},
        "steps": steps, "providers": providers, "command": "python -m benchmarks.search " + " ".join(argv or []),
    }
    log(f"{len(store)} rows, concurrency 1, {len(ms)} searches: p50 {run['p50_ms']:.1f} ms, "
        f"p99 {run['p99_ms']:.1f} ms; per step (ms, queue+compute): "
        + ", ".join(f"{m} {v['queue_ms'] + v['compute_infer_ms'] + v['compute_input_ms'] + v['compute_output_ms']:.1f}"
                    for m, v in steps.items()))
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc.setdefault("runs", []).append(run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"appended to {args.out}")
    return 0 if run["parity"]["holds"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
