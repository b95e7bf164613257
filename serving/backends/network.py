"""A network step's logic (``onnx_runner.TritonPythonModel``, which only moves tensors): functions of numpy arrays and
an onnxruntime session, importable and tested without a server (``tests/unit/test_network_step.py``).

At load, :func:`check_signature` fails a model whose ``model.onnx`` and ``config.pbtxt`` disagree, and :class:`Spec`
holds what requests are checked against. One execution, for the requests the dynamic batcher hands over:

1. :func:`read_request` checks each request's inputs (present, the config's dtype, finite, one batch size, the
   graph's dims) and the outputs it asks for;
   a request that fails becomes the :class:`RequestError` naming its problem ("<model>: " is the caller's prefix);
2. :func:`run_batched` runs the others: requests whose inputs agree on every non-batch dim are concatenated along the
   batch axis and run in one session call, the outputs split back (:func:`run_group`); a group whose run fails is
   retried one request at a time, so that only the bad request fails.

Like every module of this package it imports in the stub without the project installed: numpy and ``amc_contract``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from amc_contract import RequestError

# onnxruntime's element types for the config dtypes this project uses.
ORT_TYPES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
             np.dtype(np.int64): "tensor(int64)", np.dtype(np.int32): "tensor(int32)",
             np.dtype(np.bool_): "tensor(bool)"}


@dataclass(frozen=True)
class Spec:
    """What a network step checks requests against and runs: the config's inputs and outputs (name, numpy dtype) in
    order, whether the first dim of every tensor is Triton's batch dim (``max_batch_size`` > 0), each input's dims as
    the graph declares them (an int: fixed; a name: symbolic, "batch", "candidates", ... from
    ``amc_contract.signatures``; inputs that share a name must agree on its size)."""

    inputs: tuple[tuple[str, np.dtype], ...]
    outputs: tuple[tuple[str, np.dtype], ...]
    batched: bool = True
    graph_dims: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.outputs)


def check_signature(spec: Spec, graph_in: Mapping[str, str], graph_out: Mapping[str, str], model_name: str) -> None:
    """Fail the load, not the first request, if the graph's inputs and outputs (name -> onnxruntime type) and the
    config's (``spec``) disagree."""
    for kind, declared, graph in (("input", spec.inputs, graph_in), ("output", spec.outputs, graph_out)):
        names = [n for n, _ in declared]
        if sorted(names) != sorted(graph):
            raise ValueError(f"{model_name}: config {kind}s {names} differ from the ONNX graph's {sorted(graph)}")
        for name, dtype in declared:
            if ORT_TYPES.get(dtype, graph[name]) != graph[name]:
                raise ValueError(f"{model_name}: config declares {kind} {name} as {dtype}, the ONNX graph as "
                                 f"{graph[name]}")


# ---- a request's checks -----------------------------------------------------------------------------------------
@dataclass
class Request:
    """One request after its checks: its inputs by name (config order) and the outputs it asked for (config order)."""

    feeds: dict[str, np.ndarray]
    wanted: tuple[str, ...]


def read_request(arrays: Mapping[str, np.ndarray | None], asked: Iterable[str] | None, spec: Spec) -> Request:
    """A request's inputs by name (None where absent) and the outputs it named -> its :class:`Request`, or
    :class:`RequestError` naming the first problem."""
    return Request(check_inputs(arrays, spec), requested(asked, spec.output_names))


def check_inputs(arrays: Mapping[str, np.ndarray | None], spec: Spec) -> dict[str, np.ndarray]:
    """Each input of ``spec`` in turn present, of its dtype and, if floating, finite; then one batch size and the
    graph's dims (:func:`check_dims`)."""
    feeds: dict[str, np.ndarray] = {}
    for name, dtype in spec.inputs:
        array = arrays.get(name)
        if array is None:
            raise RequestError(f"input {name} is missing")
        if array.dtype != dtype:
            raise RequestError(f"input {name} has dtype {array.dtype}, expected {dtype}")
        if dtype.kind == "f" and not np.isfinite(array).all():
            raise RequestError(f"{name} contains NaN or infinite values")
        feeds[name] = array
    if spec.batched:
        sizes = {name: a.shape[0] if a.ndim else 0 for name, a in feeds.items()}
        if len(set(sizes.values())) > 1:
            raise RequestError(f"inputs disagree on the batch size: {sizes}")
    check_dims(feeds, spec.graph_dims)
    return feeds


def check_dims(feeds: Mapping[str, np.ndarray], graph_dims: Mapping[str, Sequence[Any]]) -> None:
    """Ranks, fixed dims and shared symbolic dims of the request against the graph's declaration: a request where they
    do not agree (regions for 3 candidates, region_mask for 2) is the caller's mistake, refused here with
    INVALID_ARGUMENT before onnxruntime fails on it with an opaque INTERNAL error."""
    seen: dict[str, tuple[str, int]] = {}  # symbolic dim -> (first input that set it, its size)
    for name, array in feeds.items():
        dims = graph_dims.get(name)
        if dims is None:
            continue
        if array.ndim != len(dims):
            raise RequestError(f"{name} has shape {list(array.shape)}, expected {len(dims)} dims {list(dims)}")
        for axis, (want, got) in enumerate(zip(dims, array.shape, strict=True)):
            if isinstance(want, int) and want >= 0 and got != want:
                raise RequestError(f"{name} has {got} at axis {axis}, expected {want} (shape {list(array.shape)})")
            if isinstance(want, str) and want:
                first = seen.setdefault(want, (name, got))
                if first[1] != got:
                    raise RequestError(f"{name} has {got} {want} (axis {axis}) but {first[0]} has {first[1]}: "
                                       f"every input must agree on the number of {want}")


def requested(asked: Iterable[str] | None, output_names: tuple[str, ...]) -> tuple[str, ...]:
    """The outputs a request asked for, in config order (all of them when it names none).

    Inside an ensemble the step is asked for every output its ``output_map`` names, whatever the client
    asked of the ensemble (Triton's ensemble scheduler adds each mapped output as requested), so this
    saves work only for direct requests that name a subset."""
    names = set(asked) if asked is not None else set()
    if not names:
        return output_names
    unknown = names - set(output_names)
    if unknown:
        raise RequestError(f"unknown output(s) requested: {sorted(unknown)}")
    return tuple(n for n in output_names if n in names)


# ---- running them -----------------------------------------------------------------------------------------------
def run_batched(requests: Sequence[Request | Exception], session: Any,
                spec: Spec) -> list[dict[str, np.ndarray] | Exception]:
    """Each request's outputs (those it asked for, by name, in config order), or its exception: those of
    ``requests`` as they are; where a group's session call fails, each of its requests' own, from a call of its own."""
    answers: list[dict[str, np.ndarray] | Exception | None] = [r if isinstance(r, Exception) else None
                                                              for r in requests]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        if isinstance(r, Request):  # requests can share one session call only when every non-batch dim agrees
            key = tuple(r.feeds[n].shape[1:] for n, _ in spec.inputs) if spec.batched else (i,)
            groups.setdefault(key, []).append(i)
    for members in groups.values():
        group = [requests[i] for i in members]
        try:
            outputs = run_group(session, [r.feeds for r in group], union([r.wanted for r in group], spec), spec)
            for i, r, out in zip(members, group, outputs, strict=True):
                answers[i] = {n: out[n] for n in r.wanted}
        except Exception as e:  # noqa: BLE001
            if len(members) == 1:
                answers[members[0]] = e
                continue
            for i, r in zip(members, group, strict=True):  # isolate the request that breaks the group
                try:
                    answers[i] = {n: a for n, a in run_group(session, [r.feeds], r.wanted, spec)[0].items()}
                except Exception as single:  # noqa: BLE001
                    answers[i] = single
    return answers  # type: ignore[return-value]


def union(wanted: Sequence[tuple[str, ...]], spec: Spec) -> tuple[str, ...]:
    """The outputs any of a group's requests asked for, in config order."""
    asked = set().union(*wanted)
    return tuple(n for n in spec.output_names if n in asked)


def run_group(session: Any, members: list[dict[str, np.ndarray]], names: tuple[str, ...],
              spec: Spec) -> list[dict[str, np.ndarray]]:
    """One session call for requests with equal non-batch shapes; outputs ``names`` split back per request.

    Each request's outputs are slices of the batch's along axis 0, so of a C-contiguous result they are contiguous
    views: no copy here; the one copy is the backend's into shared memory when the response is built."""
    if len(members) == 1:
        return [run(session, members[0], names, spec)]
    first = spec.inputs[0][0]
    feeds = {n: np.concatenate([m[n] for m in members], axis=0) for n, _ in spec.inputs}
    merged = run(session, feeds, names, spec)
    out, start = [], 0
    for m in members:
        stop = start + m[first].shape[0]
        out.append({n: a[start:stop] for n, a in merged.items()})
        start = stop
    return out


def run(session: Any, feeds: dict[str, np.ndarray], names: tuple[str, ...], spec: Spec) -> dict[str, np.ndarray]:
    """One ``session.run`` of ``names``: each output in its config dtype, C-contiguous, batch first where batched."""
    results = session.run(list(names), feeds)
    batch = next(iter(feeds.values())).shape[0] if spec.batched else None
    dtypes = dict(spec.outputs)
    out = {}
    for name, value in zip(names, results, strict=True):
        if batch is not None and (value.ndim == 0 or value.shape[0] != batch):
            raise RuntimeError(f"output {name} has shape {list(value.shape)}, expected batch {batch} first")
        # astype/ascontiguousarray copy only when ORT returned another dtype or a strided array.
        out[name] = np.ascontiguousarray(value.astype(dtypes[name], copy=False))
    return out
