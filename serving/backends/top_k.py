"""The top-k step that ends the ensembles: every candidate's outputs in, the top k of each query out.

Server-side top-k. The networks score all N candidates of a request; this step keeps the ``top_k`` best of each
query (scores descending, ties by position, as the client's own ordering) and answers their scores, modality
weights, region and keyword attention and ``candidate_index`` (which candidate each row is). Without ``top_k``
(an optional input) it answers every candidate in request order, ``candidate_index`` = 0 .. N-1, so a request
that does not ask for top-k gets what the ensembles answered before this step existed. What it saves: the
response carries k rows instead of N, and the client sorts nothing.

The Triton model ``amc_topk`` (config parameter ``mode: raw``), the end of ``amc`` / ``amc_v<N>``: its version's
``model.py`` imports :class:`TritonPythonModel` from here (``export.repository.write_step_code``); the error
responses are ``onnx_runner``'s, the in-flight counter ``admission``'s. ``candidate_index`` is the position in the
request.
(Whole-store search keeps its top k inside its graph, ONNX TopK, in its one step: ``text_step.py``, mode search.)

Tensors (names and order from config.pbtxt, generated from ``amc_contract.signatures`` TOPK)::

    in:  candidate_scores FP32 [B, N], candidate_modality_weights FP32 [B, N, 2],
         candidate_region_attention FP32 [B, N, R], candidate_keyword_attention FP32 [B, N, K],
         top_k INT64 [B, 1] (optional)
    out: scores FP32 [B, k], modality_weights FP32 [B, k, 2], region_attention FP32 [B, k, R],
         keyword_attention FP32 [B, k, K], candidate_index INT64 [B, k]

Refused with INVALID_ARGUMENT, the problem named: ``top_k`` below 1, above the request's N candidates, or
different between the queries of one request (the response is one [B, k] tensor). :func:`check_top_k` is also the
store and search steps' rule (``search.parse_request``), so ``amc_search`` refuses a bad ``top_k`` before any row is
scored. Each request is answered on its own; the instance never raises out of :meth:`TritonPythonModel.execute`,
which only moves tensors between ``pb_utils`` and numpy: :func:`select` chooses the rows, as a function of numpy
arrays (tested without a server, ``tests/unit/test_top_k_step.py``). Selection is ``argpartition`` and a sort of the k
chosen: O(N + k log k) per query.

Overload: the last step of its ensembles, it frees the in-flight slot (``admission.py``, config parameter
``admission``: the counter) that the text step took for each request, once per request it answers, ok or not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amc_contract import RequestError

from .admission import InFlight, counter_path
from .onnx_runner import config_mode, config_parameters, error_response

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (unit tests): its functions only
    pb_utils = None

MODES = ("raw",)


def best_first(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest of ``scores`` (N,), best first; equal scores in index order (what a stable
    ``argsort(-scores)[:k]`` gives), without sorting all N."""
    n = len(scores)
    if k >= n:
        return np.argsort(-scores, kind="stable")
    kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
    above = np.flatnonzero(scores > kth)
    chosen = np.sort(np.concatenate([above, np.flatnonzero(scores == kth)[: k - len(above)]]))
    return chosen[np.argsort(-scores[chosen], kind="stable")]


def check_top_k(top_k: np.ndarray, batch: int, n: int) -> int:
    """The one k of a request's ``top_k`` (B, 1), or :class:`RequestError` naming what is wrong."""
    if top_k.shape != (batch, 1):
        raise RequestError(f"top_k must have shape [batch, 1] = [{batch}, 1], got {list(top_k.shape)}")
    values = top_k.reshape(-1)
    for b, k in enumerate(values.tolist()):
        where = "" if batch == 1 else f" (query {b} of the batch)"
        if k < 1:
            raise RequestError(f"top_k is {k}{where}; it must be at least 1")
        if k > n:
            raise RequestError(f"top_k is {k}{where}, more than the {n} candidates of the request")
    if len(set(values.tolist())) > 1:
        raise RequestError(f"top_k differs between the queries of one request ({values.tolist()}); send one value, "
                           "or one request per value")
    return int(values[0])


def select(candidates: Sequence[np.ndarray | None], top_k: np.ndarray | None, names: Sequence[str]) -> list[np.ndarray]:
    """Every candidate's scores (B, N), modality weights (B, N, 2), region and keyword attention (B, N, R) and (B, N,
    K), and ``top_k`` (B, 1) or None -> the step's outputs, C-contiguous: those four of the top k of each query, best
    first, and ``candidate_index`` (B, k); without ``top_k`` every candidate in request order. ``names``: the four
    inputs' names, for the message of :class:`RequestError` where one is absent (None); a bad ``top_k``'s is
    :func:`check_top_k`'s."""
    missing = [n for n, a in zip(names, candidates, strict=True) if a is None]
    if missing:
        raise RequestError(f"inputs {missing} are missing")
    scores, weights, regions, keywords = candidates  # (B, N), (B, N, ...)
    batch, n = scores.shape
    if top_k is None:
        order = np.broadcast_to(np.arange(n), (batch, n))  # every candidate, request order
    else:
        k = check_top_k(top_k, batch, n)
        order = np.stack([best_first(scores[b], k) for b in range(batch)])  # (B, k)
    out = [np.take_along_axis(scores, order, 1), np.take_along_axis(weights, order[..., None], 1),
           np.take_along_axis(regions, order[..., None], 1), np.take_along_axis(keywords, order[..., None], 1),
           order.astype(np.int64)]
    return [np.ascontiguousarray(a) for a in out]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        self.model_name = args["model_name"]
        self.mode = config_mode(params, MODES, self.model_name)
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        expected = (5, 5)
        if (len(self.input_names), len(self.output_names)) != expected:
            raise ValueError(f"{self.model_name}: mode {self.mode} needs {expected[0]} inputs and {expected[1]} "
                             f"outputs, the config has {self.input_names} and {self.output_names}")
        self.in_flight = None
        counter = params.get("admission", "")
        if counter:
            self.in_flight = InFlight(counter_path(Path(args["model_repository"]).parent, counter,
                                                   args["model_version"]))
        pb_utils.Logger.log_info(f"{self.model_name} v{args['model_version']} ({self.mode})")

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._respond(request))
            except Exception as e:  # noqa: BLE001 - any problem is this request's error, never the instance's
                responses.append(error_response(self.model_name, e, invalid_argument=isinstance(e, RequestError)))
        if self.in_flight is not None:
            try:
                self.in_flight.release(len(requests))
            except OSError as e:
                pb_utils.Logger.log_warn(f"{self.model_name}: in-flight counter unusable ({e})")
        return responses

    def _respond(self, request: Any) -> Any:
        tensors = [pb_utils.get_input_tensor_by_name(request, n) for n in self.input_names]
        arrays = [None if t is None else t.as_numpy() for t in tensors]
        out = select(arrays[:-1], arrays[-1], self.input_names[:-1])
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, a) for name, a in zip(self.output_names, out, strict=True)])

    def finalize(self) -> None:
        if self.in_flight is not None:
            self.in_flight.close()
