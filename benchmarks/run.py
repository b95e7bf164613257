"""The serving benchmark suite: one entry point for the CPU machine and the GPU machine.

    python -m benchmarks.run --device cpu  [--sizes 100] [--concurrency 1 4] [--duration-s 8] [--out reports]
    python -m benchmarks.run --device cuda [--sizes 10 100 1000] ...           (benchmarks/gpu.sh on the device)

Methods, all on the same requests (N candidates per query, batch 1 per request unless said):
  triton_amc      the raw ensemble ``amc`` in a real tritonserver, through amc_client.AMCClient
  triton_store    the store ensemble ``amc_store`` (query + candidate ids), through tritonclient
  triton_fused    ``amc_fused`` (one graph, text features in) / ``amc_fused_store`` served by Triton
  ort             the same exported graphs in-process (QEN -> VAN, LAN -> MTN) + the same text step code
  ort_store       the store graphs in-process
  torch           amc_model.model.AMC from the checkpoint, in-process (text features by the text step code)
The server is started here on a freshly published temp repository with the benchmarks' store models added
(``benchmarks.store_models``: the store ensembles over a store built from the gallery, the fused graphs).
Writes ``serving_cpu.json`` + ``serving.md`` (cpu) or ``gpu.json`` + ``gpu.md`` + plots (cuda).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import floor, harness, inprocess, perf, triton
from .workloads import Gallery, Request, collection_words, corpus_gallery, make_requests, synthetic_gallery

DEFAULT_CHECKPOINT = Path("runs/amc/checkpoint.pt")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def ok(self, need: float = 0) -> bool:
        return self.left() > need


def measure(name: str, fn, *, results: dict, key: str, budget: Budget, need_s: float = 5):
    """Run one measurement; an error or a spent budget is recorded, never fatal."""
    if not budget.ok(need_s):
        results[key] = {"skipped": "time budget spent"}
        log(f"{key}: skipped (budget)")
        return None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001
        results[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        log(f"{key}: FAILED {results[key]['error']}")
        return None
    results[key] = out
    if isinstance(out, dict) and "p99_ms" in out:
        log(f"{key}: {out['calls_per_s']:.1f} q/s  {out['candidates_per_s']:.0f} cand/s  p50 {out['p50_ms']:.2f} "
            f"p99 {out['p99_ms']:.2f} ms  errors {out['errors']}")
    return out


def inprocess_loop(runner, pool: list[Request], batch: int, concurrency: int, duration: float) -> dict:
    n = len(pool[0])
    groups = [pool[i:i + batch] for i in range(0, len(pool) - batch + 1, batch)] or [pool[:batch]]

    def make(w):
        return lambda i: runner(groups[(i + w) % len(groups)])
    out = harness.closed_loop(make, concurrency=concurrency, duration_s=duration, items_per_call=batch * n)
    out["batch"] = batch
    out["queries_per_s"] = out["calls_per_s"] * batch
    return out


def gpu_memory_mib() -> dict:
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0].split(", ")
        return {"name": q[0], "used_mib": float(q[1]), "total_mib": float(q[2])}
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)}


# ---------------------------------------------------------------------------------------------------------
def run(args, results: dict) -> dict:
    device = args.device
    budget = Budget(args.budget_s)
    results.update({"device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
                     "cpus": os.cpu_count(), "python": platform.python_version(), "sizes": args.sizes,
                     "concurrency": args.concurrency, "duration_s": args.duration_s, "measurements": {}})
    m = results["measurements"]
    if device == "cuda":
        results["gpu"] = gpu_memory_mib().get("name", "unknown")
    import onnxruntime as ort
    results["onnxruntime"] = ort.__version__
    results["providers"] = ort.get_available_providers()

    log("floors: measuring bandwidth and matmul rate")
    rates = floor.measure_cuda() if device == "cuda" else floor.measure_cpu()
    results["rates"] = rates
    results["floors"] = {str(n): floor.floors(n, rates, device) for n in args.sizes}

    gallery: Gallery = (corpus_gallery() if args.gallery == "corpus"
                        else synthetic_gallery(collection_words(args.checkpoint), size=args.gallery_size))
    results["gallery"] = {"source": gallery.source, "images": len(gallery)}
    pools = {n: make_requests(gallery, n) for n in args.sizes}
    workdir = Path(tempfile.mkdtemp(prefix="amc-bench-"))

    log(f"publishing {args.checkpoint} into {workdir} (raw + store of {len(gallery)} + fused)")
    repo, version = triton.build_repository(workdir, args.checkpoint, gallery, log=log)
    v = str(version)

    @functools.cache
    def feeds(dev: str, store: bool) -> inprocess.TextFeeds:
        """The text step's code in-process (encoder on ``dev``), one per (device, raw/store)."""
        return inprocess.TextFeeds(repo, v, dev, store=store)

    # ---- correctness: the same candidates through every path, against ORT-CPU raw (the CPU serving path) ----
    ref = inprocess.OrtPipeline(_flat(repo, v, workdir), feeds("cpu", False), "cpu")
    checks = {}
    sample = [pools[n][0] for n in args.sizes]
    ref_scores = [ref([r]) for r in sample]
    runners = {"ort_store_" + device: lambda: inprocess.OrtPipeline(_flat(repo, v, workdir, store=True),
                                                                         feeds(device, True), device),
               "ort_" + device: lambda: inprocess.OrtPipeline(_flat(repo, v, workdir), feeds(device, False), device),
               "torch_" + device: lambda: inprocess.TorchRunner(args.checkpoint, feeds(device, False), device)}
    built = {}
    for name, make in runners.items():
        try:
            built[name] = make()
            checks[name] = max(rel_err(built[name]([r]), s) for r, s in zip(sample, ref_scores))
        except Exception as e:  # noqa: BLE001
            checks[name] = f"error: {e}"
    results["score_relative_error_vs_ort_cpu_raw"] = checks
    log(f"score checks: {checks}")

    # ---- in-process ----------------------------------------------------------------------------------
    batches = [1, 8] if device == "cuda" else [1]
    for n in args.sizes:
        pool = pools[n]
        for name, runner in built.items():
            kind = name.rsplit("_", 1)[0]
            for b in batches:
                if b > len(pool) or (n >= 1000 and b > 2 and kind != "ort_store"):
                    continue
                for c in args.concurrency if b == 1 else [1]:
                    measure(f"{kind} n{n} b{b} c{c}", lambda runner=runner, pool=pool, b=b, c=c: inprocess_loop(runner, pool, b, c, args.duration_s),
                            results=m, key=f"{kind}|{n}|b{b}|c{c}", budget=budget)
        if device == "cuda":
            fused = {"ort_fused": False, "ort_fused_store": True}
            for kind, store in fused.items():
                try:
                    r = inprocess.OrtFused(repo / ("amc_fused_store" if store else "amc_fused") / v / "model.onnx",
                                           feeds(device, store), device)
                except Exception as e:  # noqa: BLE001
                    m[f"{kind}|{n}|b1|c1"] = {"error": str(e)}
                    continue
                for b in (1, 8) if n < 1000 else (1,):
                    measure(f"{kind} n{n} b{b}", lambda r=r, pool=pool, b=b: inprocess_loop(r, pool, b, 1, args.duration_s),
                            results=m, key=f"{kind}|{n}|b{b}|c1", budget=budget)
    if device == "cuda":
        import torch
        results["torch_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    built.clear()

    # ---- Triton ----------------------------------------------------------------------------------------
    from serving.server import TritonServer

    models = triton.model_names(version)
    args.models = models
    log("starting tritonserver")
    t0 = time.monotonic()
    with TritonServer(repo, models=models, log_file=workdir / "tritonserver.log") as server:
        results["triton_start_s"] = round(time.monotonic() - t0, 1)
        url = server.grpc_url
        triton.wait_models(url, models)
        if device == "cuda":
            results["gpu_memory_with_server"] = gpu_memory_mib()
        checks = {}
        for n, r, s in zip(args.sizes, sample, ref_scores):
            try:
                got = triton.amc_client_worker(url, [r])(0)(0)
                by_id = {x.candidate_id: x.score for x in got}
                checks[f"triton_amc n{n}"] = rel_err([by_id[str(i)] if str(i) in by_id else by_id[f"{j}-{i}"]
                                                      for j, i in enumerate(r.ids.tolist())], s[0])
                checks[f"triton_store n{n}"] = rel_err(triton.store_worker(url, [r])(0)(0)[0], s[0])
                if triton.STORE_FUSED in models:
                    checks[f"triton_store_fused n{n}"] = rel_err(
                        triton.store_worker(url, [r], model=triton.STORE_FUSED)(0)(0)[0], s[0])
            except Exception as e:  # noqa: BLE001
                checks[f"n{n}"] = f"error: {e}"
        results["triton_score_relative_error_vs_ort_cpu_raw"] = checks
        log(f"triton score checks: {checks}")
        results["client_serialization"] = {str(n): triton.client_serialization_ms(pools[n][0]) for n in args.sizes
                                           if n <= 100 or device == "cuda"}
        callers = {"triton_amc": lambda pool: triton.amc_client_worker(url, pool),
                   "triton_store": lambda pool: triton.store_worker(url, pool),
                   "triton_store_fused": lambda pool: triton.store_worker(url, pool, model=triton.STORE_FUSED),
                   "triton_fused": lambda pool: triton.fused_worker(url, pool, feeds("cpu", False)),
                   "triton_fused_store": lambda pool: triton.fused_worker(url, pool, feeds("cpu", True))}
        for n in args.sizes:
            for kind, make in callers.items():
                for c in args.concurrency:
                    if n >= 1000 and c > 1 and kind in ("triton_amc", "triton_fused"):
                        continue
                    if kind == "triton_store_fused" and triton.STORE_FUSED not in models:
                        continue
                    def go(make=make, n=n, c=c):
                        before = triton.snapshot(url)
                        out = harness.closed_loop(make(pools[n]), concurrency=c, duration_s=args.duration_s,
                                                  items_per_call=n)
                        out["steps"] = triton.breakdown(before, triton.snapshot(url))
                        return out
                    measure(f"{kind} n{n} c{c}", go, results=m, key=f"{kind}|{n}|c{c}", budget=budget, need_s=10)
        if device == "cuda" and perf.available():
            results["perf_analyzer"] = perf_sweeps(url, pools, feeds, workdir, args, budget)
    # Instance sweep: k instances of every step of the two store ensembles, each k on a fresh server, both
    # store ensembles swept with perf_analyzer at 100 candidates.
    if device == "cuda" and 100 in pools and perf.available():
        sweeps: dict = {}
        results["perf_analyzer_instances"] = sweeps
        for k in args.tuned_instances:
            if not budget.ok(60):
                log(f"instances {k}: skipped (budget)")
                break
            for model in (*triton.STORE_STEP_MODELS, "amc_fused_store"):
                triton.set_instances(repo, model, k)
            with TritonServer(repo, models=models, log_file=workdir / f"tritonserver-x{k}.log") as server:
                triton.wait_models(server.grpc_url, models)
                tuned = {}
                for model in ("amc_store_fused", "amc_store"):
                    if model not in models or not budget.ok(30):
                        continue
                    data = perf.input_data(pools[100], "store", workdir / "data-store-100.json")
                    tuned[f"{model}|100"] = perf.sweep(server.grpc_url, model, data, args.tuned_concurrency, 100,
                                                       workdir, log=log, deadline=budget.deadline - 10)
                sweeps[str(k)] = tuned
    results["total_s"] = round(args.budget_s - budget.left(), 1)
    return results


def perf_sweeps(url, pools, feeds, workdir, args, budget) -> dict:
    out = {}
    # The full sweep where the targets are (store, 100 candidates); three levels elsewhere (device time).
    short = [c for c in (1, 8, 64) if c in args.perf_concurrency] or args.perf_concurrency
    plan = [("store", "amc_store", 100, args.perf_concurrency)]
    plan += [("store", triton.STORE_FUSED, 100, args.perf_concurrency)] if triton.STORE_FUSED in args.models else []
    plan += [] if args.no_raw_perf else [("raw", "amc", 100, short)]
    plan += [("fused_store", "amc_fused_store", 100, short)]
    plan += [("store", "amc_store", n, short) for n in args.sizes if n != 100]
    for kind, model, n, levels in plan:
        if n not in pools or not budget.ok(60):
            continue
        try:
            # raw requests are 25 MB each (33 MB as base64 JSON): two distinct ones are enough for perf_analyzer
            data = perf.input_data(pools[n][:2] if kind == "raw" else pools[n], kind,
                                   workdir / f"data-{kind}-{n}.json", feeds("cpu", kind == "fused_store"))
            out[f"{model}|{n}"] = perf.sweep(url, model, data, levels, n, workdir, log=log,
                                             deadline=budget.deadline - 100)
        except Exception as e:  # noqa: BLE001
            out[f"{model}|{n}"] = [{"error": str(e)[:300]}]
    return out


def _flat(repo: Path, v: str, workdir: Path, store: bool = False) -> Path:
    """A directory with <model>/model.onnx links for the in-process runners (the repository's version dirs)."""
    d = workdir / ("flat-store" if store else "flat")
    names = ["amc_qen", "amc_mtn"] + (["amc_van_store", "amc_lan_store"] if store else ["amc_van", "amc_lan"])
    for name in names:
        (d / name).mkdir(parents=True, exist_ok=True)
        link = d / name / "model.onnx"
        if not link.exists():
            link.symlink_to(repo / name / v / "model.onnx")
    return d


# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="candidates per query")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--perf-concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--duration-s", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--budget-s", type=float, default=None, help="stop measuring after this long")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--gallery", choices=("corpus", "synthetic"), default=None)
    parser.add_argument("--gallery-size", type=int, default=2000)
    parser.add_argument("--tuned-instances", type=int, nargs="*", default=[2],
                        help="instance counts of the store steps to sweep, one fresh server each")
    parser.add_argument("--tuned-concurrency", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    parser.add_argument("--no-raw-perf", action="store_true", help="skip perf_analyzer on the raw ensemble")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.sizes = args.sizes or ([10, 100, 1000] if cuda else [100])
    args.duration_s = args.duration_s or (2.0 if cuda else 8.0)
    args.budget_s = args.budget_s or (480.0 if cuda else 240.0)
    args.gallery = args.gallery or ("synthetic" if cuda else "corpus")
    from . import report

    results: dict = {}
    try:
        run(args, results)
    finally:
        if results.get("measurements") is not None:
            report.write(results, args.out)  # partial results too, if a step failed or time ran out
    return 0


if __name__ == "__main__":
    sys.exit(main())
