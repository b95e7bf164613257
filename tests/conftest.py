"""The tests, in three tiers, one folder each:

- ``unit/``: no tritonserver, no browser, no process of its own; the fast tier (``make test-fast``).
- ``parity/``: publishes real versions without a server: the exported ONNX graphs against PyTorch, the generated
  configs against the graphs, the candidate store's scores against the raw path.
- ``integration/``: starts real processes: tritonserver (one or a fleet), headless Chromium, torchrun's ranks, the
  evaluation's seed processes.

``make test`` runs all three (what CI runs). Each test is also marked with its tier (``-m unit``, ``-m "not
integration"``). The fixtures here are shared by every tier: a small real corpus and models trained on it
(session-scoped, built once per run, on first use).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.corpus import CorpusConfig, load_corpus
from training.train import TrainResult, train
from training.train_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TIERS = ("unit", "parity", "integration")
# The repository's own feature cache, so a second test run skips feature extraction.
SMALL_CORPUS = CorpusConfig(max_images=160, cache_dir=str(ROOT / ".cache" / "amc"))


@pytest.fixture(scope="session")
def small_corpus():
    return load_corpus(SMALL_CORPUS, progress=False)


@pytest.fixture(scope="session")
def trained(small_corpus, tmp_path_factory) -> TrainResult:
    out = tmp_path_factory.mktemp("run")
    return train(TrainConfig(out=str(out), epochs=4, patience=10, batch_size=32, progress=False,
                             corpus=SMALL_CORPUS), small_corpus)


@pytest.fixture(scope="session")
def trained_other(small_corpus, tmp_path_factory) -> TrainResult:
    """A second training run (another seed): a different model version to roll out."""
    out = tmp_path_factory.mktemp("run_other")
    return train(TrainConfig(out=str(out), seed=1, epochs=4, patience=10, batch_size=32, progress=False,
                             corpus=SMALL_CORPUS), small_corpus)


@pytest.fixture(scope="session")
def bench_repo(trained, small_corpus, tmp_path_factory):
    """The benchmarks' repository (``benchmarks.triton.build_repository``): ``trained`` published with the keywords
    of 60 corpus images (the gallery the requests draw candidates from), and 20 test queries (tests/parity and
    tests/integration test_benchmarks.py)."""
    from benchmarks import triton
    from benchmarks.workloads import Gallery

    gallery = Gallery(small_corpus.regions[:60], small_corpus.keywords[:60],
                      [q.text for q in small_corpus.queries["test"]][:20], "corpus")
    repo, version = triton.build_repository(tmp_path_factory.mktemp("bench"), trained.checkpoint, gallery,
                                            log=lambda *_: None)
    return repo, version, gallery


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its tier, the folder it is in."""
    for item in items:
        tier = item.path.relative_to(ROOT / "tests").parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/parity or tests/integration")
        item.add_marker(tier)
