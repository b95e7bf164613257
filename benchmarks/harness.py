"""Closed-loop load: C workers each send one request at a time for a fixed duration; latency percentiles."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np


def closed_loop(make_worker: Callable[[int], Callable[[int], object]], *, concurrency: int, duration_s: float,
                items_per_call: int, warmup_calls: int = 2, max_calls: int = 1_000_000) -> dict:
    """Run ``concurrency`` threads; ``make_worker(w)`` returns ``call(i)`` (one request). Bounded by time and count.

    ``items_per_call``: candidates scored per call (queries x candidates), for candidates/s.
    """
    workers = [make_worker(w) for w in range(concurrency)]
    for call in workers:
        for i in range(warmup_calls):
            call(i)
    latencies: list[list[float]] = [[] for _ in workers]
    errors: list[str] = []
    start_gate = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def loop(w: int) -> None:
        call, lat = workers[w], latencies[w]
        start_gate.wait()
        i = 0
        while time.perf_counter() < stop_at[0] and i < max_calls:
            t0 = time.perf_counter()
            try:
                call(i)
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
                errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                if len(errors) > 20:
                    return
                continue
            lat.append(time.perf_counter() - t0)
            i += 1

    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + duration_s
    t_start = time.perf_counter()
    start_gate.wait()
    for t in threads:
        t.join(timeout=duration_s + 600)
    elapsed = time.perf_counter() - t_start
    return summarize([x for lat in latencies for x in lat], elapsed, concurrency, items_per_call, errors)


def summarize(latencies_s: list[float], elapsed_s: float, concurrency: int, items_per_call: int,
              errors: list[str] | None = None) -> dict:
    lat = np.array(latencies_s) * 1e3
    calls = len(lat)
    out = {"concurrency": concurrency, "calls": calls, "duration_s": round(elapsed_s, 3),
           "calls_per_s": calls / elapsed_s if elapsed_s > 0 else 0.0,
           "candidates_per_s": calls * items_per_call / elapsed_s if elapsed_s > 0 else 0.0,
           "errors": len(errors or []), "first_error": (errors or [None])[0]}
    if calls:
        out.update({"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                    "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean())})
    return out
