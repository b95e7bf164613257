"""Fault-injection helpers shared by the reliability tests and benchmark (``tests/integration/test_reliability.py``,
``benchmarks/reliability.py``): a servable model without training, the Python-backend stub processes of a
running server, and the catalogue of malformed requests every replica must answer with INVALID_ARGUMENT.

Nothing here runs in production serving; ``serving.supervisor`` is what repairs a replica.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amc_contract import signatures as sig

# A few keyword documents for the untrained model's term weights (IDF); any will do.
_DOCUMENTS = [["cat", "face"], ["dog", "red heart"], ["kiwi fruit", "food"], ["heart", "love"], ["cat", "hat"]]


def untrained_checkpoint(path: str | Path, *, seed: int = 0) -> Path:
    """Write a randomly initialised AMC checkpoint (no training: a forward pass is all serving needs).

    Its scores mean nothing, but it exports, validates and serves exactly as a trained one does, so fault,
    overload and TLS tests do not have to wait for (or compete with) a training run.
    """
    import torch

    from amc_contract.text import TermWeights
    from amc_model.checkpoint import save_checkpoint
    from amc_model.model import AMC, AMCConfig

    torch.manual_seed(seed)
    model = AMC(AMCConfig()).eval()
    save_checkpoint(path, model, TermWeights.from_documents(_DOCUMENTS).to_json(),
                    train_config={"note": "untrained, for fault and load tests"})
    return Path(path)


def publish_untrained(repository: str | Path, *, seed: int = 0) -> int:
    """A serving repository with one version of an untrained model; returns the version."""
    from export.publish import publish

    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    checkpoint = untrained_checkpoint(repository.parent / f"untrained-{seed}.pt", seed=seed)
    return publish(checkpoint, repository, log=lambda *_: None)


# ---- stub processes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process: ``name`` is the model instance (``amc_tokenizer_0_0``)."""

    pid: int
    name: str
    model: str


def instance_model(instance: str) -> str:
    """The model of a model instance's name: ``amc_tokenizer_0_1`` -> ``amc_tokenizer`` (``<model>_<group>_<index>``)."""
    return instance.rsplit("_", 2)[0] if instance.count("_") >= 2 else instance


def stubs(server_pid: int) -> Iterator[Stub]:
    """The stub processes under ``server_pid`` (tritonserver starts one per Python-backend model instance,
    ``triton_python_backend_stub <model.py> <shm region> ... <instance name>``; the instance name is
    ``<model>_<group>_<index>``)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != server_pid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if not argv or not argv[0].endswith(b"triton_python_backend_stub"):
            continue
        instance = next((a.decode() for a in reversed(argv) if a.startswith(b"amc_") or b"_0_" in a), "")
        yield Stub(int(entry.name), instance, instance_model(instance))


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def server_rss_mb(server_pid: int) -> float:
    """tritonserver plus its stub processes, in MB."""
    return rss_mb(server_pid) + sum(rss_mb(s.pid) for s in stubs(server_pid))


def kill(pid: int, sig_: int = 9) -> None:
    os.kill(pid, sig_)


# ---- malformed requests ----------------------------------------------------------------------------------
def request(query: bytes = b"cat face", n: int = 2, r: int = 3, d: int = sig.REGION_FEATURE_DIM,
            k: int = 2, dtype: str = "float32", batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A well-formed raw request of the ``amc`` ensemble (``batch`` queries, ``n`` candidates, ``r`` regions,
    ``k`` keyword slots); the malformed cases below start from it and break one thing."""
    rng = np.random.default_rng(seed)
    keywords = np.full((batch, n, k), b"", dtype=object)
    if k:
        keywords[..., 0] = b"cat"
    return {sig.QUERY.name: np.array([[query]] * batch, dtype=object),
            sig.REGIONS.name: np.abs(rng.normal(size=(batch, n, r, d))).astype(dtype),
            sig.REGION_MASK.name: np.ones((batch, n, r), dtype=bool),
            sig.KEYWORDS.name: keywords}


def raw_inputs(arrays: dict[str, np.ndarray]) -> list:
    """``tritonclient`` inputs for arrays of any dtype and shape, unchecked: how a request reaches a replica from a
    caller that does not use ``amc_client`` (whose own packing validates first)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, value in arrays.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def _with(arrays: dict[str, np.ndarray], **changes: np.ndarray) -> dict[str, np.ndarray]:
    return {**arrays, **changes}


def _set(arrays: dict[str, np.ndarray], name: str, index: tuple, value: object) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in arrays.items()}
    out[name][index] = value
    return out


def bad_requests() -> dict[str, tuple[dict[str, np.ndarray], str]]:
    """Malformed requests, each with a fragment its INVALID_ARGUMENT message must contain."""
    q, rg, m, kw = sig.QUERY.name, sig.REGIONS.name, sig.REGION_MASK.name, sig.KEYWORDS.name
    base = request()
    too_many_keywords = request(n=1, r=1, k=10_000)
    long_keyword = " ".join(["word"] * (sig.MAX_KEYWORD_WORDS + 1)).encode()
    return {
        "empty query": (request(query=b""), "query is empty"),
        "whitespace query": (request(query=b" \t\n"), "query is empty"),
        "query not UTF-8": (request(query=b"\xff\xfecat"), "query is not valid UTF-8"),
        "1 MB query": (request(query=b"cat " * 262_144), f"maximum of {sig.MAX_QUERY_BYTES} bytes"),
        "keyword not UTF-8": (_set(base, kw, (0, 1, 0), b"\xc3\x28"), "is not valid UTF-8"),
        "NaN regions": (_set(base, rg, (0, 1, 2, 7), np.nan), "NaN or infinite"),
        "inf regions": (_set(base, rg, (0, 0, 0, 0), np.inf), "NaN or infinite"),
        "-inf regions": (_set(base, rg, (0, 0, 1, 3), -np.inf), "NaN or infinite"),
        "regions for more candidates than keywords": (
            _with(base, **{rg: request(n=3)[rg]}), "candidates"),
        "keywords for more candidates than regions": (
            _with(request(n=3), **{kw: base[kw]}), "candidates"),
        "region_mask for fewer regions than regions": (
            _with(base, **{m: np.ones((1, 2, 2), dtype=bool)}), "regions"),
        "no regions": (request(r=0), "no region"),
        "empty candidate set": (request(n=0), "candidate set is empty"),
        "1001 candidates": (request(n=sig.MAX_CANDIDATES + 1, r=1), f"maximum of {sig.MAX_CANDIDATES}"),
        "5000 candidates": (request(n=5000, r=1), f"maximum of {sig.MAX_CANDIDATES}"),
        "10000 keywords per candidate": (too_many_keywords, f"maximum of {sig.MAX_KEYWORDS}"),
        "keyword of too many words": (_set(base, kw, (0, 0, 1), long_keyword),
                                      f"maximum of {sig.MAX_KEYWORD_WORDS} words"),
        "keyword of too many bytes": (_set(base, kw, (0, 0, 1), b"x" * (sig.MAX_KEYWORD_BYTES + 1)),
                                      f"maximum of {sig.MAX_KEYWORD_BYTES} bytes"),
        "regions of 1000 features": (request(d=1000), rg),
        "regions as float64": (request(dtype="float64"), rg),
        "query batch 2, regions batch 1": (_with(base, **{q: np.array([[b"cat"], [b"dog"]], dtype=object)}),
                                           "batch"),
        "batch over max_batch_size": (request(batch=sig.MAX_BATCH + 1, n=1, r=1), "batch"),
        "no keyword slot": (request(k=0), "keyword slot"),
        "missing keywords": ({k: v for k, v in base.items() if k != kw}, kw),
    }
