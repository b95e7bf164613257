"""Triton side: publish a temp repository, start tritonserver, drive it, read its statistics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from amc_contract import signatures as sig

from .workloads import Gallery, Request

STAT_KEYS = ("queue", "compute_input", "compute_infer", "compute_output")


def build_repository(workdir: Path, checkpoint: Path, gallery: Gallery, *, log=print) -> tuple[Path, int]:
    """Publish ``checkpoint`` as version N of a fresh python-flavour repository under ``workdir`` (a temp folder),
    without a store; returns (repository, N). The raw text step's keyword table holds the gallery's keywords, as a
    deployment's would hold its collection's."""
    from export.publish import publish

    repo = workdir / "repository"
    keywords = sorted({k for kws in gallery.keywords for k in kws if k})
    version = publish(checkpoint, repo, flavour="python", keywords=keywords, log=log)
    return repo, version


def parameter(repo: Path, model: str, key: str) -> str:
    """Config parameter ``key`` of ``model`` in a benchmark repository ("" where it is not set)."""
    from export.repository import parse_config

    return parse_config((repo / model / "config.pbtxt").read_text()).parameters[key].string_value


def set_parameter(repo: Path, models: list[str], key: str, value: str) -> None:
    """Set config parameter ``key`` of each model in a benchmark repository (before the server starts)."""
    from export.repository import parse_config, to_text

    for name in models:
        path = repo / name / "config.pbtxt"
        config = parse_config(path.read_text())
        config.parameters[key].string_value = value
        path.write_text(to_text(config))


def snapshot(url: str) -> dict[str, dict[str, int]]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(as_json=True)
    out = {}
    for m in stats.get("model_stats", []):
        s = m.get("inference_stats", {})
        row = {"requests": int(s.get("success", {}).get("count", 0)),
               "executions": int(m.get("execution_count", 0)),
               "inferences": int(m.get("inference_count", 0))}
        for k in STAT_KEYS:
            row[f"{k}_ns"] = int(s.get(k, {}).get("ns", 0))
        out[f"{m['name']}:{m.get('version', '')}"] = row
    return out


def breakdown(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model: requests, mean batch per execution, and mean ms per request in queue / compute steps."""
    out = {}
    for key, a in after.items():
        b = before.get(key, {})
        n = a["requests"] - b.get("requests", 0)
        if n <= 0:
            continue
        execs = a["executions"] - b.get("executions", 0)
        row = {"requests": n, "executions": execs,
               "mean_batch": (a["inferences"] - b.get("inferences", 0)) / execs if execs else 0.0}
        for k in STAT_KEYS:
            row[f"{k}_ms"] = (a[f"{k}_ns"] - b.get(f"{k}_ns", 0)) / n / 1e6
        out[key.split(":")[0]] = row
    return out


# ---- callers: make_worker(w) -> call(i) ----------------------------------------------------------------
def amc_client_worker(url: str, requests: list[Request], model_version: int | None = None):
    """The project's client on the raw ensemble (``amc``, or ``amc_v<N>``), one client per worker."""
    from amc_client import AMCClient, CandidateArrays

    sets = [CandidateArrays([str(i) for i in r.ids.tolist()] if len(set(r.ids.tolist())) == len(r)
                            else [f"{j}-{i}" for j, i in enumerate(r.ids.tolist())], r.regions, r.keywords,
                            r.region_mask) for r in requests]

    def make(w: int):
        client = AMCClient(url, timeout_s=120, model_version=model_version, routing_refresh_s=3600, retries=0)

        def call(i: int):
            k = (i + w) % len(requests)
            return client.rank(requests[k].query, sets[k], validate=False)
        return call
    return make


def _outputs(signature: sig.StepSignature):
    """Requested outputs: every output of ``signature``."""
    import tritonclient.grpc as grpcclient

    return [grpcclient.InferRequestedOutput(n) for n in signature.output_names]


def _input(name: str, array: np.ndarray, datatype: str):
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def client_serialization_ms(request: Request, repeats: int = 5) -> dict[str, float]:
    """Client-side cost of one raw ``amc`` request before it reaches the wire: AMCClient's packing, tritonclient's
    numpy->bytes copy, and building + serializing the gRPC protobuf (median ms of ``repeats``)."""
    from tritonclient.grpc._utils import _get_inference_request

    from amc_client import CandidateArrays, pack_request

    cands = CandidateArrays([f"c{i}" for i in range(len(request))], request.regions, request.keywords,
                            request.region_mask)
    pack, tensors, proto = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        arrays = pack_request([request.query], [cands], validate=False)
        t1 = time.perf_counter()
        inputs = [_input(s.name, arrays[s.name], s.triton_datatype) for s in sig.ENSEMBLE.inputs if s.name in arrays]
        t2 = time.perf_counter()
        req = _get_inference_request(sig.ENSEMBLE_NAME, inputs, "", "", _outputs(sig.ENSEMBLE), 0, False, False,
                                     0, None, None)
        data = req.SerializeToString()
        t3 = time.perf_counter()
        pack.append(t1 - t0)
        tensors.append(t2 - t1)
        proto.append(t3 - t2)
    return {"pack_ms": float(np.median(pack)) * 1e3, "set_data_from_numpy_ms": float(np.median(tensors)) * 1e3,
            "protobuf_serialize_ms": float(np.median(proto)) * 1e3, "request_bytes": len(data)}


def model_names(version: int) -> list[str]:
    """What :func:`build_repository`'s repository serves the benchmarks: ``amc``'s steps, ``amc_v<N>`` and ``amc``."""
    from export.configs import STEPS

    return [s.model_name for s in STEPS] + [sig.versioned_ensemble_name(version), sig.ENSEMBLE_NAME]


def wait_models(url: str, names: list[str], timeout_s: float = 120) -> None:
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout_s
    with grpcclient.InferenceServerClient(url) as client:
        while not all(client.is_model_ready(n) for n in names):
            if time.monotonic() > deadline:
                raise TimeoutError(f"models not ready: {names}")
            time.sleep(0.2)


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=float)
