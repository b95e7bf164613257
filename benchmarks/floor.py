"""Floors: what one query must at least cost on the CPU, from this machine's measured copy and matmul rates.

raw path: the candidates' region features (N x 49 x 1280 float32) must pass through memory once, and VAN's PCA +
W_v projection is most of the FLOPs. store path: the projected features (N x 49 x hidden) are read instead; the
projection is gone.
"""

from __future__ import annotations

import time

import numpy as np

from amc_contract import signatures as sig

R, D = sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM


def flops_per_query(n: int, *, pca: int = 256, hidden: int = 128, keywords: int = 6, words: int = 2,
                    word_dim: int = 50, store: bool = False) -> float:
    van_project = 0 if store else n * R * (D * pca + pca * hidden) * 2
    van_attend = n * R * hidden * 4  # tanh(u).s_q, softmax-weighted sum
    lan = n * keywords * (words * word_dim + word_dim * hidden * 2 + hidden * 3)
    mtn = n * hidden * 10
    return float(van_project + van_attend + lan + mtn)


def bytes_per_query(n: int, *, hidden: int = 128, store: bool = False) -> int:
    return n * R * (hidden if store else D) * 4


def _best(f, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_cpu() -> dict[str, float]:
    a = np.ones(64 << 20, dtype=np.float32)  # 256 MB
    b = np.empty_like(a)
    copy_s = _best(lambda: np.copyto(b, a))
    m = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    mm_s = _best(lambda: m @ m)
    return {"memory_copy_gb_s": 2 * a.nbytes / copy_s / 1e9, "matmul_fp32_tflop_s": 2 * 2048**3 / mm_s / 1e12}


def floors(n: int, rates: dict[str, float]) -> dict[str, float]:
    """Per-query floor in ms for the raw and store paths, and the candidates/s it allows (``rates`` as
    :func:`measure_cpu` measures them: a copy reads and writes, so memory moves at half the copy rate)."""
    out = {}
    for path, store in (("raw", False), ("store", True)):
        nbytes, flops = bytes_per_query(n, store=store), flops_per_query(n, store=store)
        bw, rate = rates["memory_copy_gb_s"] / 2, rates["matmul_fp32_tflop_s"]
        t_bytes, t_flops = nbytes / (bw * 1e9), flops / (rate * 1e12)
        t = max(t_bytes, t_flops)
        out[path] = {"bytes": nbytes, "flops": flops, "bytes_ms": t_bytes * 1e3, "flops_ms": t_flops * 1e3,
                     "floor_ms": t * 1e3, "floor_candidates_per_s": n / t, "bound": "bytes" if t_bytes >= t_flops
                     else "flops"}
    return out
