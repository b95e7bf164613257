"""Reliability against a real tritonserver (issue 9): error codes, request bounds, overload, TLS, self-healing.

The served model is an untrained AMC (``serving.faults.publish_untrained``: random weights, exported and
validated like a trained one), so these tests need no training run. Every malformed request must come back
INVALID_ARGUMENT with a message naming the problem, the client must map server faults to
ServerUnavailableError, and the server must keep answering good requests throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from amc_client import AMCClient, Candidate, InvalidInputError
from amc_client import signatures as sig
from export.repository import STEPS
from serving import faults
from serving.server import TritonServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    repo = tmp_path_factory.mktemp("reliability") / "repository"
    return repo, faults.publish_untrained(repo)


def _models(version: int) -> list[str]:
    return [s.model_name for s in STEPS] + [sig.versioned_ensemble_name(version), sig.ENSEMBLE_NAME]


@pytest.fixture(scope="module")
def server(repository: tuple[Path, int]) -> Iterator[TritonServer]:
    repo, version = repository
    with TritonServer(repo, models=_models(version), log_file=repo.parent / "tritonserver.log") as srv:
        yield srv


def send(server: TritonServer, arrays: dict[str, np.ndarray], model: str = sig.ENSEMBLE_NAME) -> dict:
    inputs = []
    for name, value in arrays.items():
        datatype = "BYTES" if value.dtype == object else {"float32": "FP32", "float64": "FP64", "bool": "BOOL",
                                                          "int64": "INT64"}[value.dtype.name]
        tensor = grpcclient.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        result = client.infer(model, inputs, client_timeout=120)
    return {name: result.as_numpy(name) for name in sig.ENSEMBLE.output_names}


def assert_serves(server: TritonServer) -> None:
    out = send(server, faults.request(n=3, r=4))
    assert out[sig.SCORES.name].shape == (1, 3) and np.isfinite(out[sig.SCORES.name]).all()


BAD = faults.bad_requests()


@pytest.mark.parametrize("case", list(BAD))
def test_every_caller_mistake_is_invalid_argument(server: TritonServer, case: str) -> None:
    arrays, fragment = BAD[case]
    with pytest.raises(InferenceServerException) as info:
        send(server, arrays)
    error = info.value
    assert error.status() == "StatusCode.INVALID_ARGUMENT", f"{case}: {error.status()} {error.message()}"
    assert fragment in error.message(), f"{case}: {error.message()}"
    assert server.poll() is None
    assert_serves(server)


@pytest.mark.parametrize("query", ["?!", "...", "kiwifruit", "😺", "a" * sig.MAX_QUERY_BYTES])
def test_odd_but_valid_queries_are_ranked(server: TritonServer, query: str) -> None:
    out = send(server, faults.request(query=query.encode()))
    assert np.isfinite(out[sig.SCORES.name]).all()


def _candidate(i: int, keywords: list[str]) -> Candidate:
    return Candidate(f"c{i}", np.ones((2, sig.REGION_FEATURE_DIM), np.float32), keywords)


def test_bounds_are_enforced_by_the_client_and_the_server_alike(server: TritonServer) -> None:
    cases = {
        f"{sig.MAX_QUERY_BYTES}": ("x" * (sig.MAX_QUERY_BYTES + 1), [_candidate(0, ["cat"])]),
        f"{sig.MAX_KEYWORDS}": ("cat", [_candidate(0, [f"k{j}" for j in range(sig.MAX_KEYWORDS + 1)])]),
        f"{sig.MAX_KEYWORD_WORDS}": ("cat", [_candidate(0, [" ".join(["w"] * (sig.MAX_KEYWORD_WORDS + 1))])]),
        f"{sig.MAX_KEYWORD_BYTES}": ("cat", [_candidate(0, ["x" * (sig.MAX_KEYWORD_BYTES + 1)])]),
        f"{sig.MAX_CANDIDATES}": ("cat", [_candidate(i, ["cat"]) for i in range(sig.MAX_CANDIDATES + 1)]),
    }
    with AMCClient(server.grpc_url, timeout_s=120) as client:
        for limit, (query, candidates) in cases.items():
            with pytest.raises(InvalidInputError, match=limit) as local:
                client.rank(query, candidates)
            assert local.value.__cause__ is None  # refused before any network call
            with pytest.raises(InvalidInputError, match=rf"INVALID_ARGUMENT.*{limit}"):
                client.rank(query, candidates, validate=False)
        # At the bounds, everything is accepted.
        at = [_candidate(0, [" ".join(["w"] * sig.MAX_KEYWORD_WORDS), "x" * sig.MAX_KEYWORD_BYTES]),
              _candidate(1, [f"k{j}" for j in range(sig.MAX_KEYWORDS)])]
        assert len(client.rank("y" * sig.MAX_QUERY_BYTES, at)) == 2
