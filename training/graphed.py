"""A training step replayed from a CUDA graph: forward, backward, DDP's all-reduce and the optimizer at once.

Why: a step of this model is ~800 small kernels. At batch 1,024 on an H200 launching them from Python takes
~11 ms, about as long as the GPU's work (~13 ms), so the step is bound by the CPU; under DDP each GPU's half of
the work hides behind the same launch cost and 2 GPUs were no faster than one (reports/ddp_details.json). A
captured graph launches every kernel of the step with one call, and the step takes what the GPU needs.

What makes the capture valid (PyTorch's "CUDA Graphs" notes, whole-network capture and DDP):

- fixed shapes: every step has ``batch_size`` queries (``training.train`` makes an epoch's last batch the
  permutation's last ``batch_size`` queries when graphs are on);
- no host synchronization inside the step: the query embeddings and lexical features are gathered on the
  device (``training.data.LoggedPairs``), the losses are tensors, nothing calls ``.item()``;
- the optimizer made with ``capturable=True`` (its step counters live on the device);
- DDP constructed on :attr:`GraphedStep.stream`, and at least 11 eager DDP iterations on that stream before the
  capture (DDP instruments its first iterations);
- gradients set to None before the capture: the captured backward then writes each step's gradient into the
  graph's own buffers instead of adding to the last one, and the captured optimizer reads them there.

The inputs (query rows and candidate indices) are copied into the graph's static buffers on the same stream
before each replay, so a copy never overwrites a batch the previous replay is still reading.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.distributed import upload

# DDP samples its runtime statistics in its first iterations; PyTorch's notes ask for 11 eager ones first.
DDP_WARMUP_STEPS = 11


class GraphedStep:
    """``step(rows, index)``: one optimizer step on a batch, eager for the first ``warmup`` calls, then captured
    once and replayed. ``loss_of(rows, index)`` computes the batch's loss from device tensors (the query rows
    (B,) and candidate indices (B, N)); returns this step's loss (a tensor the next step does not overwrite)."""

    def __init__(self, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, device: torch.device, *, warmup: int = DDP_WARMUP_STEPS) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if warmup < 1:  # the optimizer's state must exist before the capture, or its zero-fill is replayed
            raise ValueError(f"a graphed step needs at least 1 eager warmup step (DDP: {DDP_WARMUP_STEPS}), got {warmup}")
        for group in optimizer.param_groups:
            if not group.get("capturable", False):
                raise ValueError("a graphed step needs an optimizer made with capturable=True")
        self.loss_of = loss_of
        self.optimizer = optimizer
        self.device = device
        self.warmup = warmup
        self.stream = torch.cuda.Stream(device)  # construct DDP with this stream current (see the module doc)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._rows = self._index = self._loss = None

    def __call__(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        current = torch.cuda.current_stream(self.device)
        # Whatever the caller queued on its stream (evaluation, a copy of the best weights) happens before this
        # step changes the weights in place, and the loss is read back on the caller's stream after it.
        self.stream.wait_stream(current)
        if self.graph is not None:
            if rows.shape != self._rows.shape or index.shape != self._index.shape:
                raise ValueError(f"a graphed step replays batches of {tuple(self._index.shape)}, got "
                                 f"{tuple(index.shape)}")
            with torch.cuda.stream(self.stream):
                self._rows.copy_(rows.pin_memory(), non_blocking=True)
                self._index.copy_(index.pin_memory(), non_blocking=True)
                self.graph.replay()
            current.wait_stream(self.stream)
            return self._loss.clone()  # on the caller's stream: the next replay cannot overwrite it
        with torch.cuda.stream(self.stream):
            rows, index = upload(rows, self.device), upload(index, self.device)
            self.optimizer.zero_grad(set_to_none=True)
            if self.calls <= self.warmup:
                loss = self.loss_of(rows, index)
                loss.backward()
                self.optimizer.step()
                loss = loss.detach()
            else:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    captured = self.loss_of(rows, index)
                    captured.backward()
                    self.optimizer.step()
                self.graph, self._rows, self._index, self._loss = graph, rows, index, captured.detach()
                self.graph.replay()  # capturing ran nothing: this batch's step is the first replay
                loss = self._loss
        current.wait_stream(self.stream)
        return loss.clone()
