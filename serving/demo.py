"""The main job, end to end: corpus, training, export, a real tritonserver, queries through the client.

    python -m serving.demo            (what `make demo` runs)

Builds (or reuses) the corpus and the checkpoint in ``--run``, publishes it as version 1 of a fresh
repository with a candidate store of every corpus image, starts tritonserver on free loopback ports, ranks a
few test queries' candidate lists through :class:`amc_client.AMCClient`, prints each ranking with its modality
weights and top keywords, searches the whole store for a few queries (``AMCClient.search``: the top 5 of every
image, server-side), writes the CLI's candidate file for one query (so ``amc-client rank`` can be tried by
hand), stops the server, and ends by saying how to open the search page (``make ui``, ``ui/``) on this repository.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from amc_client import AMCClient, Candidate
from amc_client.cli import format_table, save_candidates
from amc_contract import signatures as sig
from export.publish import publish
from export.repository import STEPS
from export.store import Gallery
from serving.server import TritonServer
from training.corpus import CorpusConfig, load_corpus
from training.metrics import ndcg_at_k
from training.train import train
from training.train_config import TrainConfig

DEMO_MARKER = ".amc-demo-repository"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/amc"), help="training output (reused if present)")
    parser.add_argument("--repository", type=Path, default=Path("runs/demo-repository"),
                        help="serving repository; recreated by the demo")
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    print("== 1/4 corpus")
    corpus = load_corpus(CorpusConfig())
    print(corpus.summary())
    checkpoint = args.run / "checkpoint.pt"
    print("== 2/4 training")
    if checkpoint.exists() and not args.retrain:
        print(f"reusing {checkpoint} (pass --retrain to train again)")
    else:
        result = train(TrainConfig(out=str(args.run)), corpus)
        print(f"trained in {result.seconds:.0f} s: val NDCG@10 {result.val['ndcg@10']:.4f}, "
              f"test NDCG@10 {result.test['ndcg@10']:.4f}")

    print("== 3/4 export and publish")
    if args.repository.exists() and not (args.repository / DEMO_MARKER).exists():
        parser.error(f"{args.repository} exists and was not made by the demo; refusing to delete it")
    shutil.rmtree(args.repository, ignore_errors=True)
    args.repository.mkdir(parents=True)
    (args.repository / DEMO_MARKER).write_text("made by python -m serving.demo; deleted and remade by each run\n")
    # The text step's keyword table: every keyword of the corpus the model was trained on (already loaded here);
    # the candidate store for whole-store search: every corpus image, its keywords embedded from that table.
    version = publish(checkpoint, args.repository, keywords=sorted({k for kw in corpus.keywords for k in kw if k}),
                      store=Gallery.of_corpus(corpus))

    print("== 4/4 serve with tritonserver and query through the client")
    models = [s.model_name for s in STEPS] + [sig.versioned_ensemble_name(version), sig.ENSEMBLE_NAME]
    models += [sig.SEARCH_STEP.model_name, sig.versioned_search_ensemble_name(version), sig.SEARCH_ENSEMBLE_NAME]
    with TritonServer(args.repository, models=models) as server, AMCClient(server.grpc_url, timeout_s=60) as client:
        print(f"tritonserver ready at {server.grpc_url} (pid {server.pid})")
        test = corpus.queries["test"]
        # Skin-tone variants make up much of CLDR; show ordinary names for a readable demo.
        picks = [q for q in test if q.kind == "name" and "skin tone" not in q.text][: (args.queries + 1) // 2]
        picks += [q for q in test if q.kind == "keyword"][: args.queries - len(picks)]
        for query in picks:
            candidates = [Candidate(id=f"{corpus.chars[i]} {corpus.names[i][:28]}",
                                    regions=corpus.regions[i].astype(np.float32), keywords=corpus.keywords[i])
                          for i in query.candidates]
            t0 = time.perf_counter()
            results = client.rank(query.text, candidates)
            ms = (time.perf_counter() - t0) * 1000
            relevance = {c.id: int(r) for c, r in zip(candidates, query.relevance, strict=True)}
            ndcg = ndcg_at_k(np.array([-r.rank for r in results]), np.array([relevance[r.candidate_id] for r in results]), 10)
            print(f"\nquery {query.text!r}: {len(candidates)} candidates in {ms:.0f} ms, NDCG@10 {ndcg:.3f}, "
                  f"model version {results[0].model_version}")
            print(format_table(results[:5]))
        # "thumbs up" and "red heart" once put images first whose only link to the query was a wrong auto-tag
        # (issue 21); "🐱" and "thumbs_up" are read as "cat face" and "thumbs up" (amc_contract.text.normalize_query).
        for text in [picks[0].text, "thumbs up", "red heart", "🐱", "thumbs_up"]:
            t0 = time.perf_counter()
            found = client.search(text, top_k=5)
            ms = (time.perf_counter() - t0) * 1000
            print(f"\nsearch {text!r}: top 5 of the whole store ({len(corpus.regions)} images) in {ms:.0f} ms, "
                  f"model version {found[0].model_version}")
            print(format_table(found))
        example = Path(args.run) / "example_candidates.npz"
        save_candidates(example, candidates)
        print(f"\ntry it by hand: start `make serve REPOSITORY={args.repository}` and run\n"
              f"  .venv/bin/amc-client rank {picks[-1].text!r} --candidates {example} --url <grpc url>\n"
              f"  .venv/bin/amc-client search 'cat face' --top-k 5 --url <grpc url>")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; server stopped")
    print(f"\nsee the results in a browser (the search page, with the model's explanations):\n"
          f"  make serve REPOSITORY={args.repository}      # the server, in one shell\n"
          f"  make ui REPOSITORY={args.repository}         # the page, in another; then open http://127.0.0.1:8080/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
