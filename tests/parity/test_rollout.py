"""Rollout's repository side without a server: a publish whose store fails, and a search re-pin that Triton refuses,
leave the repository as it was (rollouts against a real tritonserver: tests/integration/test_rollout.py)."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from amc_contract import signatures as sig
from export.publish import publish, published_versions
from export.repository import store_serving_version
from export.store import Gallery
from serving.rollout import Rollout, RolloutError


def store_gallery(small_corpus, channels: int = sig.REGION_FEATURE_DIM) -> Gallery:
    """The corpus as a candidate store (its region features cut to ``channels``)."""
    regions = small_corpus.regions[..., :channels]
    return Gallery(regions, small_corpus.keywords, [f"s{g}" for g in range(len(regions))])


def test_publish_with_a_gallery_that_fails_leaves_the_repository_as_it_was(trained, small_corpus, tmp_path):
    repository = tmp_path / "repository"
    v1 = publish(trained.checkpoint, repository, log=lambda *_: None)
    before = sorted(p.relative_to(repository) for p in repository.rglob("*"))
    with pytest.raises(RuntimeError):  # 640-channel region features: the store's projection cannot take them
        publish(trained.checkpoint, repository, store=store_gallery(small_corpus, channels=640), log=lambda *_: None)
    assert published_versions(repository) == [v1]
    assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == before
    assert store_serving_version(repository) is None


def test_a_failed_search_re_pin_leaves_the_store_ensembles_as_they_were(trained, small_corpus, tmp_path,
                                                                        monkeypatch):
    """Promote re-pins whole-store search to the new version's store; where Triton refuses that reload, the
    repository keeps what it had: here no store served before, so the store ensembles written for the re-pin
    are removed again (a later load must not pick up a half-done re-pin)."""
    repository = tmp_path / "repository"
    v1 = publish(trained.checkpoint, repository, log=lambda *_: None)  # no store: search serves nothing
    v2 = publish(trained.checkpoint, repository, store=store_gallery(small_corpus), log=lambda *_: None)
    assert store_serving_version(repository) is None and v2 == v1 + 1
    before = sorted(p.name for p in repository.iterdir())

    def refuse(model, config=None):
        raise InferenceServerException(f"failed to load '{model}'", status="StatusCode.INTERNAL")

    with Rollout(repository, "127.0.0.1:1", log=lambda *_: None) as rollout:
        monkeypatch.setattr(rollout, "_load", refuse)
        with pytest.raises(RolloutError, match="re-pinning whole-store search .* failed"):
            rollout._follow_with_store(v2)
    assert sorted(p.name for p in repository.iterdir()) == before
    assert store_serving_version(repository) is None
