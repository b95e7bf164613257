"""perf_analyzer (GPU machine only; it needs glibc 2.38): concurrency sweeps with Triton's per-step statistics."""

from __future__ import annotations

import base64
import csv
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from .triton import breakdown, snapshot

# perf_analyzer's exit code when a concurrency gave no stable measurement (its src/constants.h; 99: other errors).
STABILITY_ERROR = 2
UNSTABLE = "Failed to obtain stable measurement"


def binary() -> str | None:
    """The perf_analyzer executable itself. The PyPI wheel (perf-analyzer 2.60, what the GPU machine stages) puts a
    console script ``perf_analyzer`` on the PATH whose ``main`` is ``subprocess.run([<package>/bin/perf_analyzer,
    *argv])`` and drops that run's return code: the script exits 0 even when the measurement failed. The wheel's own
    binary returns perf_analyzer's exit code, so it is preferred; elsewhere (NVIDIA's SDK container) the one on the
    PATH is the binary."""
    try:
        spec = importlib.util.find_spec("perf_analyzer")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        exe = Path(folder) / "bin" / "perf_analyzer"
        if os.access(exe, os.X_OK):
            return str(exe)
    return shutil.which("perf_analyzer")


def available() -> bool:
    return binary() is not None


def _b64(a: np.ndarray) -> dict:
    return {"b64": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode(), "shape": list(a.shape)}


def sweep(url: str, model: str, data: Path, concurrency: list[int], n: int, workdir: Path, *,
          interval_ms: int = 1000, log=print, deadline=None, batch: int = 1) -> list[dict]:
    """One perf_analyzer run per concurrency level; Triton statistics deltas per level give the step breakdown.

    ``batch``: queries per request (perf_analyzer's ``-b``; a client's ``rank_many``). perf_analyzer counts
    inferences as requests x batch, so ``queries_per_s`` and ``candidates_per_s`` count every query.

    A point is measured only when this call's own CSV was written (perf_analyzer writes ``-f`` only after a stable
    measurement, and exits 2 without it): the CSV is named after ``data`` (one file per variant and size) and removed
    before each call, so a failed call is recorded as an error, never as an earlier call's figures. A measurement that
    did not stabilize is tried once more with twice the interval (the first windows after a server start can hold the
    search step's CUDA graph captures); ``--warmup-request-count`` sends requests at the same concurrency before the
    windows for the same reason (Triton's statistics, ``steps``, count the warm-up and every window)."""
    import time

    exe = binary() or "perf_analyzer"
    points = []
    for c in concurrency:
        if deadline is not None and time.monotonic() > deadline:
            log(f"perf {model} n{n}: time budget spent, stopping before concurrency {c}")
            break
        out_csv = workdir / f"perf-{data.stem}-c{c}-b{batch}.csv"
        point: dict = {"concurrency": c, "queries_per_request": batch}
        for interval in (interval_ms, 2 * interval_ms):  # the second only after an unstable measurement
            out_csv.unlink(missing_ok=True)  # a file of an earlier call must never be read as this call's
            cmd = [exe, "-m", model, "-i", "grpc", "-u", url, "--input-data", str(data), "-b", str(batch),
                   "--concurrency-range", f"{c}:{c}", "--measurement-interval", str(interval),
                   "--warmup-request-count", str(min(32, max(16, 4 * c))),  # below the input data's 64 requests
                   "--stability-percentage", "30", "--max-trials", "4", "-f", str(out_csv), "--verbose-csv"]
            before = snapshot(url)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired as e:
                point = {"concurrency": c, "error": f"perf_analyzer timed out: {e}"}
                break
            after = snapshot(url)
            text = proc.stdout + proc.stderr
            if proc.returncode == 0 and out_csv.exists():
                point = {**point, **_read_csv(out_csv, n, batch), "measurement_interval_ms": interval,
                         "steps": breakdown(before, after)}
                break
            unstable = proc.returncode == STABILITY_ERROR or UNSTABLE in text
            point = {"concurrency": c, "error": f"exit {proc.returncode}: {text[-400:]}",
                     "measurement_interval_ms": interval, "unstable": unstable}
            log(f"perf {model} n{n} c{c} failed ({interval} ms windows): {proc.stdout[-800:]} {proc.stderr[-800:]}")
            if not unstable:
                break
        points.append(point)
        if "error" in point:
            break
        log(f"perf {model} n{n} c{c}: {point['queries_per_s']:.0f} q/s, {point['candidates_per_s']:.0f} cand/s, "
            f"p99 {point['p99_ms']:.2f} ms")
    return points


def _read_csv(path: Path, n: int, batch: int) -> dict:
    """perf_analyzer's --verbose-csv row of the one concurrency (latencies in us) as the point's figures."""
    row = next(csv.DictReader(path.read_text().splitlines()))
    qps = float(row["Inferences/Second"])
    return {"queries_per_request": batch, "queries_per_s": qps, "candidates_per_s": qps * n,
            "p50_ms": float(row["p50 latency"]) / 1e3, "p95_ms": float(row["p95 latency"]) / 1e3,
            "p99_ms": float(row["p99 latency"]) / 1e3, "avg_ms": float(row["Avg latency"]) / 1e3,
            "client_send_ms": float(row["Client Send"]) / 1e3, "client_recv_ms": float(row["Client Recv"]) / 1e3,
            "network_server_ms": float(row["Network+Server Send/Recv"]) / 1e3,
            "server_queue_ms": float(row["Server Queue"]) / 1e3,
            "server_compute_input_ms": float(row["Server Compute Input"]) / 1e3,
            "server_compute_infer_ms": float(row["Server Compute Infer"]) / 1e3,
            "server_compute_output_ms": float(row["Server Compute Output"]) / 1e3}
