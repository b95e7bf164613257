"""Shared fixtures: a small real corpus and a model trained on it (session-scoped, built once per run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.corpus import CorpusConfig, load_corpus
from training.train import TrainResult, train
from training.train_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
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
