"""training.graphed: a step replayed from a CUDA graph trains exactly what eager steps train.

The GPU test runs where CUDA is (on the GPU machine, which lacks the client package that conftest imports:
``python3 -m pytest --noconftest tests/unit/test_graphed.py``; passed on 2x H200, 2026-11-26); on the CPU the
refusals are what can be checked.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.graphed import GraphedStep

CUDA = torch.cuda.is_available()


def _model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 4, 1)).to(device)


def test_a_graphed_step_refuses_the_cpu_and_an_optimizer_that_cannot_be_captured():
    model = _model("cpu")
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(lambda r, i: model(i).mean(), torch.optim.AdamW(model.parameters()), torch.device("cpu"))
    if CUDA:
        with pytest.raises(ValueError, match="capturable=True"):
            GraphedStep(lambda r, i: model(i).mean(), torch.optim.AdamW(model.parameters()), torch.device("cuda"))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_graph_replays_train_the_same_weights_as_eager_steps():
    device = torch.device("cuda")
    batches = [(torch.randint(0, 3, (8,)), torch.randint(0, 50, (8, 4))) for _ in range(20)]
    weight = torch.tensor([1.0, 2.0, 0.5], device=device)

    def loss_of(model):
        return lambda rows, index: (model(index).squeeze(1) * weight[rows]).square().mean()

    eager = _model("cuda")
    opt = torch.optim.AdamW(eager.parameters(), lr=1e-2, capturable=True)
    want = []
    for rows, index in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(eager)(rows.to(device), index.to(device))
        loss.backward()
        opt.step()
        want.append(loss.item())

    graphed = _model("cuda")
    step = GraphedStep(loss_of(graphed), torch.optim.AdamW(graphed.parameters(), lr=1e-2, capturable=True), device,
                       warmup=3)
    got = [step(rows, index) for rows, index in batches]  # 3 eager, then a capture and 16 replays
    assert step.graph is not None
    assert [g.item() for g in got] == pytest.approx(want, rel=1e-5)  # each step's own loss, none overwritten
    for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="replays batches of"):
        step(batches[0][0][:4], batches[0][1][:4])


PACK = Path(__file__).resolve().parents[2] / ".cache" / "ddp" / "pack.npz"


@pytest.mark.skipif(not CUDA or not PACK.exists(), reason="needs a CUDA device and the DDP pack (make ddp-pack)")
def test_training_with_graphed_steps_equals_eager_training(tmp_path, monkeypatch):
    """``training.train`` on the GPU with ``cuda_graph`` on and off, at a batch that divides the training pairs
    (so both draw the same batches) and with the same AdamW variant (``capturable``, which a graph needs, sums in
    another order than the default one: 3e-5 apart in the first epoch's loss): the same losses and validation
    NDCG to the last digit. Passed on an H200, 2026-11-26."""
    from benchmarks.ddp import unpack
    from training.train import train
    from training.train_config import TrainConfig

    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: adamw(*a, **{**kw, "capturable": True}))
    corpus, prepared = unpack(PACK)
    cfg = TrainConfig(epochs=2, patience=3, batch_size=904, device="cuda", progress=False, sampling="vectorized")
    runs = {graph: train(replace(cfg, out=str(tmp_path / str(graph)), cuda_graph=graph), corpus, prepared=prepared)
            for graph in (True, False)}
    assert runs[True].history[0]["samples"] % cfg.batch_size == 0  # 29 full batches: none overlaps
    assert [(h["loss"], h["val_ndcg@10"]) for h in runs[True].history] == \
        [(h["loss"], h["val_ndcg@10"]) for h in runs[False].history]
