"""Triton's own per-request timestamps (``--trace-config level=TIMESTAMPS``) summarized per phase.

Triton's statistics give a model's mean queue and compute time from the moment a request exists in the server;
they do not see the gRPC front end taking the request in (5 MB at 20 candidates) nor sending the answer. Its
trace does: for a sampled top-level request, GRPC_WAITREAD_START/END (the front end waiting for and reading the
request), REQUEST_START/END (inside the server) and GRPC_SEND_START/END, plus one child trace per ensemble step.

Used by ``benchmarks.reliability --trace-rate N``: the server starts with tracing configured but off, tracing is
switched on through the trace-settings API for the measured window only, and the file Triton writes at shutdown
is summarized here, answered and refused requests apart (a refused request of the raw ensemble has no VAN child:
the text step stopped it, or its full entrance queue did). A refusal sent early (the text step's response sender) may leave before REQUEST_END: send_ms
is then below zero.

Caveat: GRPC_WAITREAD_START is when the front end began waiting for its next request, so on an idle server it
includes the time before the client sent; under overload requests queue at the front end and it is the wait
plus the read.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

PHASES = {  # name -> (from, to)
    "intake_ms": ("GRPC_WAITREAD_START", "GRPC_WAITREAD_END"),
    "in_server_ms": ("REQUEST_START", "REQUEST_END"),
    "send_ms": ("REQUEST_END", "GRPC_SEND_END"),
    "total_ms": ("GRPC_WAITREAD_START", "GRPC_SEND_END"),
}


def server_args(path: Path) -> list[str]:
    """tritonserver flags: trace to ``path`` (written at shutdown), off until :func:`switch` turns it on."""
    return ["--trace-config", f"triton,file={path}", "--trace-config", "level=OFF",
            "--trace-config", "rate=1000", "--trace-config", "count=-1"]


def switch(grpc_url: str, rate: int | None) -> None:
    """Trace one request in ``rate`` from now on (None: stop tracing)."""
    import tritonclient.grpc as grpcclient

    settings = ({"trace_level": ["TIMESTAMPS"], "trace_rate": str(rate)} if rate
                else {"trace_level": ["OFF"]})
    with grpcclient.InferenceServerClient(grpc_url) as client:
        client.update_trace_settings(settings=settings)


def summarize(path: Path, ensemble: str, refused_without: str) -> dict:
    """Per phase p50/p90/p99 (ms) of the sampled top-level ``ensemble`` requests, ``answered`` (a child trace of
    step ``refused_without`` exists) and ``refused`` (none) apart; ``{}`` when the file is missing."""
    if not path.is_file():
        return {}
    models: dict[int, dict] = {}
    stamps: dict[int, dict[str, int]] = defaultdict(dict)
    for entry in json.loads(path.read_text() or "[]"):
        if "model_name" in entry:
            models[entry["id"]] = entry
        for stamp in entry.get("timestamps", []):
            stamps[entry["id"]][stamp["name"]] = stamp["ns"]
    children: dict[int, set[str]] = defaultdict(set)
    for entry in models.values():
        if entry.get("parent_id") is not None:
            children[entry["parent_id"]].add(entry["model_name"])
    rows: dict[str, list[list[float]]] = {"answered": [], "refused": []}
    for trace_id, entry in models.items():
        t = stamps[trace_id]
        if entry.get("parent_id") is not None or entry["model_name"] != ensemble:
            continue
        if not all(a in t and b in t for a, b in PHASES.values()):
            continue
        kind = "answered" if refused_without in children[trace_id] else "refused"
        rows[kind].append([(t[b] - t[a]) / 1e6 for a, b in PHASES.values()])
    out = {}
    for kind, values in rows.items():
        if not values:
            continue
        a = np.array(values)
        out[kind] = {"sampled": len(a)} | {
            name: [round(float(np.percentile(a[:, j], q)), 1) for q in (50, 90, 99)]
            for j, name in enumerate(PHASES)}
    return out | {"percentiles": [50, 90, 99]} if out else {}
