"""perf_analyzer (GPU machine only; it needs glibc 2.38): concurrency sweeps with Triton's per-step statistics."""

from __future__ import annotations

import base64
import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np

from .triton import breakdown, snapshot


def available() -> bool:
    return shutil.which("perf_analyzer") is not None


def _b64(a: np.ndarray) -> dict:
    return {"b64": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode(), "shape": list(a.shape)}


def sweep(url: str, model: str, data: Path, concurrency: list[int], n: int, workdir: Path, *,
          interval_ms: int = 1000, log=print, deadline=None, batch: int = 1) -> list[dict]:
    """One perf_analyzer run per concurrency level; Triton statistics deltas per level give the step breakdown.

    ``batch``: queries per request (perf_analyzer's ``-b``; a client's ``rank_many``). perf_analyzer counts
    inferences as requests x batch, so ``queries_per_s`` and ``candidates_per_s`` count every query."""
    import time

    points = []
    for c in concurrency:
        if deadline is not None and time.monotonic() > deadline:
            log(f"perf {model} n{n}: time budget spent, stopping before concurrency {c}")
            break
        out_csv = workdir / f"perf-{model}-{n}-{c}-b{batch}.csv"
        cmd = ["perf_analyzer", "-m", model, "-i", "grpc", "-u", url, "--input-data", str(data), "-b", str(batch),
               "--concurrency-range", f"{c}:{c}", "--measurement-interval", str(interval_ms),
               "--stability-percentage", "30", "--max-trials", "4", "-f", str(out_csv), "--verbose-csv"]
        before = snapshot(url)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired as e:
            points.append({"concurrency": c, "error": f"perf_analyzer timed out: {e}"})
            break
        after = snapshot(url)
        if proc.returncode != 0 or not out_csv.exists():
            log(f"perf {model} n{n} c{c} failed: {proc.stdout[-800:]} {proc.stderr[-800:]}")
            points.append({"concurrency": c, "error": (proc.stdout + proc.stderr)[-400:]})
            break
        row = next(csv.DictReader(out_csv.open()))
        qps = float(row["Inferences/Second"])
        point = {"concurrency": c, "queries_per_request": batch, "queries_per_s": qps, "candidates_per_s": qps * n,
                 "p50_ms": float(row["p50 latency"]) / 1e3, "p95_ms": float(row["p95 latency"]) / 1e3,
                 "p99_ms": float(row["p99 latency"]) / 1e3, "avg_ms": float(row["Avg latency"]) / 1e3,
                 "client_send_ms": float(row["Client Send"]) / 1e3, "client_recv_ms": float(row["Client Recv"]) / 1e3,
                 "network_server_ms": float(row["Network+Server Send/Recv"]) / 1e3,
                 "server_queue_ms": float(row["Server Queue"]) / 1e3,
                 "server_compute_input_ms": float(row["Server Compute Input"]) / 1e3,
                 "server_compute_infer_ms": float(row["Server Compute Infer"]) / 1e3,
                 "server_compute_output_ms": float(row["Server Compute Output"]) / 1e3,
                 "steps": breakdown(before, after)}
        log(f"perf {model} n{n} c{c}: {qps:.0f} q/s, {qps * n:.0f} cand/s, p99 {point['p99_ms']:.2f} ms")
        points.append(point)
    return points
