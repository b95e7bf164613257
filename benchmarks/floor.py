"""Floors: what one query must at least cost, from measured bandwidth and matmul rate on this machine.

raw path: the candidates' region features (N x 49 x 1280 float32) must reach the device that runs VAN
(host -> device copy; on the CPU, one pass through memory), and VAN's PCA + W_v projection is most of the
FLOPs. store path: the projected features (N x 49 x hidden) are read from device memory; the projection is gone.
"""

from __future__ import annotations

import time

import numpy as np

from amc_client import signatures as sig

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


def measure_cuda() -> dict[str, float]:
    import torch

    dev = torch.device("cuda")
    out = {}
    n = 64 << 20  # 256 MB of float32
    src = torch.ones(n, device=dev)
    dst = torch.empty_like(src)
    host_pinned = torch.ones(n).pin_memory()
    host = torch.ones(n)

    def timed(f, repeats=10):
        f()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            f()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats

    out["device_copy_gb_s"] = 2 * n * 4 / timed(lambda: dst.copy_(src)) / 1e9
    out["h2d_pinned_gb_s"] = n * 4 / timed(lambda: dst.copy_(host_pinned, non_blocking=True)) / 1e9
    out["h2d_pageable_gb_s"] = n * 4 / timed(lambda: dst.copy_(host)) / 1e9
    src = dst = host_pinned = host = None  # free before the matmuls
    k = 8192
    a = torch.randn(k, k, device=dev)
    b = torch.randn(k, k, device=dev)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    out["matmul_fp32_tflop_s"] = 2 * k**3 / timed(lambda: a @ b, 5) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = True
    out["matmul_tf32_tflop_s"] = 2 * k**3 / timed(lambda: a @ b, 5) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = prev
    ah, bh = a.half(), b.half()
    out["matmul_fp16_tflop_s"] = 2 * k**3 / timed(lambda: ah @ bh, 5) / 1e12
    return out


def floors(n: int, rates: dict[str, float], device: str) -> dict[str, float]:
    """Per-query floor in ms for the raw and store paths, and the candidates/s it allows."""
    out = {}
    for path, store in (("raw", False), ("store", True)):
        nbytes, flops = bytes_per_query(n, store=store), flops_per_query(n, store=store)
        if device == "cuda":
            bw = rates["device_copy_gb_s"] / 2 if store else rates["h2d_pinned_gb_s"]
            rate = rates["matmul_fp32_tflop_s"]
        else:
            bw, rate = rates["memory_copy_gb_s"] / 2, rates["matmul_fp32_tflop_s"]
        t_bytes, t_flops = nbytes / (bw * 1e9), flops / (rate * 1e12)
        t = max(t_bytes, t_flops)
        out[path] = {"bytes": nbytes, "flops": flops, "bytes_ms": t_bytes * 1e3, "flops_ms": t_flops * 1e3,
                     "floor_ms": t * 1e3, "floor_candidates_per_s": n / t, "bound": "bytes" if t_bytes >= t_flops
                     else "flops"}
    return out


# ---- the store path per candidate (issue 10): what one candidate of a query costs at least ---------------
def store_candidate_cost(*, hidden: int, keywords: int, regions: int = R, store_bytes: int = 4) -> dict[str, float]:
    """Bytes and FLOPs of one candidate on the store path (``fused_store.onnx``), each tensor touched once.

    device bytes: the stored rows read (projected regions R x hidden and keywords K x hidden at ``store_bytes``
    each, their bool masks), the per-candidate inputs read (id, K x 3 lexical features) and the outputs written
    (score, 2 weights, R region and K keyword attention weights, fp32). host bytes: what crosses the host link
    per candidate (the inputs in, the outputs out). FLOPs: VAN after its projection (tanh, kernel product,
    softmax, weighted sum: ~5 R hidden), LAN over the projected keywords (lexical vector, logits, softmax, weighted
    sum: ~11 K hidden) and MTN (three cosines and the fusion: ~15 hidden).
    """
    inputs = 8 + keywords * 3 * 4
    outputs = 4 + 2 * 4 + regions * 4 + keywords * 4
    stored = (regions + keywords) * (hidden * store_bytes + 1)
    flops = 5 * regions * hidden + 4 * regions + 11 * keywords * hidden + 18 * keywords + 15 * hidden + 4
    return {"device_bytes": float(stored + inputs + outputs), "host_bytes": float(inputs + outputs),
            "stored_bytes": float(stored), "flops": float(flops)}


def matmul_flops_per_row(onnx_path) -> float:
    """FLOPs per input row (token) of an ONNX graph's MatMul/Gemm nodes with a 2-D constant weight: 2 x its size
    (what a transformer encoder does per token, attention scores aside)."""
    import onnx

    model = onnx.load(str(onnx_path))
    constants = {i.name: tuple(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input[:2]:
                dims = constants.get(name)
                if dims is not None and len(dims) == 2:
                    total += 2 * dims[0] * dims[1]
    return float(total)


def store_floor(n: int, rates: dict[str, float], device: str, *, hidden: int, keywords: int, query_flops: float,
                store_bytes: int = 4) -> dict[str, float | str]:
    """Candidates/s no implementation of the store path can beat on this machine, with ``n`` candidates per
    query sharing the query's own FLOPs (``query_flops``: the sentence encoder). Rates as :func:`measure_cuda`
    measures them: device bytes over the device copy rate (bytes read + written), host bytes over the pinned
    host->device rate, FLOPs over the fp32 matmul rate (the elementwise work runs below it, so this is generous)."""
    cost = store_candidate_cost(hidden=hidden, keywords=keywords, store_bytes=store_bytes)
    flops = cost["flops"] + query_flops / n
    if device == "cuda":
        terms = {"device_bytes": cost["device_bytes"] / (rates["device_copy_gb_s"] * 1e9),
                 "host_link": cost["host_bytes"] / (rates["h2d_pinned_gb_s"] * 1e9),
                 "flops": flops / (rates["matmul_fp32_tflop_s"] * 1e12)}
    else:
        terms = {"device_bytes": cost["device_bytes"] / (rates["memory_copy_gb_s"] * 1e9),
                 "flops": flops / (rates["matmul_fp32_tflop_s"] * 1e12)}
    bound = max(terms, key=terms.get)
    return {**cost, "flops_with_query_share": flops, "store_bytes_per_value": store_bytes,
            **{f"{k}_ns": v * 1e9 for k, v in terms.items()}, "bound": bound,
            "floor_candidates_per_s": 1.0 / terms[bound]}
