"""Training's data-parallel pieces in one process: the share of a batch each rank takes, the logged pairs' gathered
features, the vectorized sampler, and precomputed lexical features (2 gloo processes under torchrun against one
process: tests/integration/test_ddp.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from amc_model.checkpoint import load_checkpoint
from tests.conftest import SMALL_CORPUS
from training.distributed import Dist
from training.train import train
from training.train_config import TrainConfig

# 60 images: 73 training queries, so batch 32 gives batches of 32, 32 and 9; the last is split 5 / 4.
TINY = replace(SMALL_CORPUS, max_images=60)
CONFIG = TrainConfig(epochs=2, patience=10, batch_size=32, progress=False, corpus=TINY)


def test_shard_covers_the_batch_once():
    for n in (1, 5, 9, 32):
        for world in (1, 2, 3):
            spans = [Dist(rank=r, world=world).shard(n) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


@pytest.mark.slow
def test_precomputed_lexical_features_train_the_same_model(tmp_path):
    """LoggedPairs (the default) gathers the features a step used to compute, bit for bit: on the CPU the same
    losses and weights to the last bit (so the figures trained before it still describe this code)."""
    cfg = replace(CONFIG, epochs=1)
    table = train(replace(cfg, out=str(tmp_path / "table")))
    per_step = train(replace(cfg, out=str(tmp_path / "per_step"), precompute_lexical=False))
    assert table.history[0]["loss"] == per_step.history[0]["loss"]
    a, b = load_checkpoint(table.checkpoint).state_dict, load_checkpoint(per_step.checkpoint).state_dict
    assert [name for name, ref in b.items() if not torch.equal(a[name], ref)] == []


def test_logged_pairs_gather_the_features_of_each_drawn_candidate():
    import numpy as np

    from amc_contract.text import LexicalMatcher, TermWeights
    from training.data import CorpusTensors, LoggedPairs

    keywords = np.array([["cat", "hat"], ["dog", ""], ["red", "hat"], ["cat", "face"]], dtype=object)
    matcher = LexicalMatcher(TermWeights.from_documents([[k for k in row if k] for row in keywords]))

    class Texts:  # the sentence encoder is not what this test is about
        def get(self, texts, kind="query"):
            return np.arange(len(texts), dtype=np.float32)[:, None].repeat(2, 1)

    data = CorpusTensors(torch.zeros(4, 1, 1), torch.zeros(4, 2, 2), keywords, matcher, Texts())
    texts = ["cat in a hat", "red dog"]
    lists = [np.array([0, 2, 3]), np.array([1, 2])]
    pairs = LoggedPairs(data, texts, lists, torch.device("cpu"))
    qids, index = torch.tensor([1, 0, 0]), torch.tensor([[2, 1, -1], [3, 0, 2], [0, 3, -1]])
    query, lexical = pairs.gather(qids, index)
    want = data.lexical([texts[i] for i in qids.tolist()], index)
    assert lexical.abs().sum() > 0
    torch.testing.assert_close(lexical, want, rtol=0, atol=0)
    torch.testing.assert_close(query[:, 0], qids.float())

    with pytest.raises(RuntimeError, match="not in its query's logged list"):
        pairs.gather(torch.tensor([1]), torch.tensor([[0]]))  # image 0 is not in query 1's list


def test_vectorized_sampling_draws_valid_distinct_candidates():
    import numpy as np

    from training.sampling import BatchSampler

    pairs = [
        (0, np.array([5]), np.arange(10, 40)),
        (1, np.array([6, 7]), np.arange(40, 44)),
        (2, np.array([8, 9, 3]), np.arange(50, 70)),
    ]
    sampler = BatchSampler(pairs, negatives=8)
    rng = np.random.default_rng(0)
    seen = {i: set() for i in range(3)}
    for _ in range(200):
        qids, index = sampler(np.array([2, 0, 1]), rng)
        assert qids == [2, 0, 1] and index.shape == (3, 9)
        for row, p in zip(index.numpy(), [2, 0, 1]):
            _, clicked, unclicked = pairs[p]
            assert row[0] in clicked and set(row[1:]) <= set(unclicked)
            if len(unclicked) >= 8:
                assert len(set(row[1:])) == 8  # distinct when there are enough
            seen[p].add(int(row[0]))
    assert seen[2] == {8, 9, 3} and seen[1] == {6, 7}  # every positive gets drawn
