"""DDP under torchrun: 2 gloo processes on the CPU train the same model as one process at the same global batch.

An integration test: it starts torchrun and two training processes (each importing torch and training on the
60-image corpus), so it is too slow for the fast tier. The sharding, the logged pairs and the sampler are unit-tested in
tests/unit/test_ddp.py.

Why the tolerances: every rank draws the same global batch and the losses are means over queries, scaled so
that DDP's gradient average is the global batch's gradient (``training.train``'s docstring); what differs is
only float32 summation order (two half-batch sums and an all-reduce instead of one sum). That moves a loss by
~1e-7 relative. Adam divides each gradient by its running RMS, so a weight whose gradient is near zero can move
by ~lr for a rounding-sized difference: per-tensor relative weight differences of ~1e-6 are typical, up to
~1e-3 on the 3-element lexical weights. A wrong sharding fails the loss check by far: with the uneven last batch's loss
scale dropped the first epoch's loss moved by 1%, with the contrastive loss limited to the local share's images
by 20% (both mutations were tried).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from amc_model.checkpoint import load_checkpoint
from tests.conftest import ROOT
from tests.unit.test_ddp import CONFIG, TINY
from training.train import train

LOSS_RTOL = 1e-5
# Losses agree to 1e-5; weights drift further in floating point: Adam turns the summation-order noise of a weight
# with a near-zero gradient into full-size steps, and the collection loss's softmax at temperature 0.05 magnifies that
# noise 20x (lan.lexical_logit drifted 1.3% over the two epochs on this tiny corpus).
WEIGHT_RTOL = 3e-2


def test_two_gloo_processes_equal_one_process(tmp_path):
    one = train(replace(CONFIG, out=str(tmp_path / "one")))

    out = tmp_path / "two"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "training.train",
        "--out",
        str(out),
        "--epochs",
        str(CONFIG.epochs),
        "--patience",
        str(CONFIG.patience),
        "--batch_size",
        str(CONFIG.batch_size),
        "--progress",
        "false",
        "--corpus.max_images",
        str(TINY.max_images),
        "--corpus.cache_dir",
        TINY.cache_dir,
    ]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("checkpoint ") == 1, proc.stdout  # rank 0 alone reports

    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [h["epoch"] for h in one.history]
    for mine, ref in zip(history, one.history):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL), (mine, ref)
        assert mine["val_ndcg@10"] == pytest.approx(ref["val_ndcg@10"], abs=1e-6)

    a, b = load_checkpoint(one.checkpoint), load_checkpoint(out / "checkpoint.pt")  # same format: loads as is
    assert a.model_config == b.model_config
    assert sorted(a.state_dict) == sorted(b.state_dict)
    assert sorted(a.train_config) == sorted(b.train_config)
    for name, ref in a.state_dict.items():
        ref, mine = ref.float(), b.state_dict[name].float()
        assert mine.shape == ref.shape, name
        assert (mine - ref).norm() <= WEIGHT_RTOL * ref.norm() + 1e-6, (
            name,
            (mine - ref).norm() / ref.norm(),
        )
    assert b.metrics["val_ndcg@10"] == pytest.approx(a.metrics["val_ndcg@10"], abs=1e-6)
    assert not torch.isnan(torch.tensor(history[-1]["loss"]))
