"""The CPU serving benchmark (``make bench``): what ranking given candidates costs on the CPU machine.

    python -m benchmarks.run --device cpu [--sizes 100] [--concurrency 1 4] [--duration-s 8] [--out reports]

(Serving on a GPU is ``bash benchmarks/gpu.sh``, ``benchmarks.search_gpu``; this suite's GPU mode, issue 10's
store ensembles on the device, left the tree: ``git show 132d596:benchmarks/run.py``. Whole-store search on the CPU
is ``benchmarks.search``, the second half of ``make bench``.)

Methods, all on the same requests (N candidates per query, batch 1 per request):
  triton_amc      the raw ensemble ``amc`` in a real tritonserver, through amc_client.AMCClient (``rank``)
  ort             the same exported graphs in-process (QEN -> VAN, LAN -> MTN) + the same text step code
  torch           amc_model.model.AMC from the checkpoint, in-process (text features by the text step code)
The server is started here on a freshly published temp repository. Writes ``serving_cpu.json`` + ``serving.md``.
(Issue 10's store ensembles, ``amc_store``, ``amc_store_fused`` and the fused graphs, which this suite also measured
beside ``amc``, left the tree once ``AMCClient.search`` took over: ``git show 1285aea:benchmarks/store_models.py``.)
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from amc_contract import signatures as sig

from . import floor, harness, inprocess, triton
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


# ---------------------------------------------------------------------------------------------------------
def run(args, results: dict) -> dict:
    device = args.device
    budget = Budget(args.budget_s)
    results.update({"device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
                     "cpus": os.cpu_count(), "python": platform.python_version(), "sizes": args.sizes,
                     "concurrency": args.concurrency, "duration_s": args.duration_s, "measurements": {}})
    m = results["measurements"]
    import onnxruntime as ort
    results["onnxruntime"] = ort.__version__
    results["providers"] = ort.get_available_providers()

    log("floors: measuring bandwidth and matmul rate")
    rates = floor.measure_cpu()
    results["rates"] = rates
    results["floors"] = {str(n): floor.floors(n, rates) for n in args.sizes}

    gallery: Gallery = (corpus_gallery() if args.gallery == "corpus"
                        else synthetic_gallery(collection_words(args.checkpoint), size=args.gallery_size))
    results["gallery"] = {"source": gallery.source, "images": len(gallery)}
    pools = {n: make_requests(gallery, n) for n in args.sizes}
    workdir = Path(tempfile.mkdtemp(prefix="amc-bench-"))

    log(f"publishing {args.checkpoint} into {workdir} (keywords of {len(gallery)} gallery images)")
    repo, version = triton.build_repository(workdir, args.checkpoint, gallery, log=log)
    v = str(version)

    @functools.cache
    def feeds(dev: str) -> inprocess.TextFeeds:
        """The text step's code in-process (encoder on ``dev``), one per device."""
        return inprocess.TextFeeds(repo, v, dev)

    # ---- correctness: the same candidates through every path, against ORT-CPU raw (the CPU serving path) ----
    ref = inprocess.OrtPipeline(_flat(repo, v, workdir), feeds("cpu"), "cpu")
    checks = {}
    sample = [pools[n][0] for n in args.sizes]
    ref_scores = [ref([r]) for r in sample]
    runners = {"ort_" + device: lambda: inprocess.OrtPipeline(_flat(repo, v, workdir), feeds(device), device),
               "torch_" + device: lambda: inprocess.TorchRunner(args.checkpoint, feeds(device), device)}
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
    for n in args.sizes:
        pool = pools[n]
        for name, runner in built.items():
            kind = name.rsplit("_", 1)[0]
            for c in args.concurrency:
                measure(f"{kind} n{n} b1 c{c}", lambda runner=runner, pool=pool, c=c: inprocess_loop(runner, pool, 1, c, args.duration_s),
                        results=m, key=f"{kind}|{n}|b1|c{c}", budget=budget)
    built.clear()

    # ---- Triton ----------------------------------------------------------------------------------------
    from serving.server import TritonServer

    models = triton.model_names(version)
    log("starting tritonserver")
    t0 = time.monotonic()
    with TritonServer(repo, models=models, log_file=workdir / "tritonserver.log") as server:
        results["triton_start_s"] = round(time.monotonic() - t0, 1)
        url = server.grpc_url
        triton.wait_models(url, models)
        checks = {}
        for n, r, s in zip(args.sizes, sample, ref_scores):
            try:
                got = triton.amc_client_worker(url, [r])(0)(0)
                by_id = {x.candidate_id: x.score for x in got}
                checks[f"triton_amc n{n}"] = rel_err([by_id[str(i)] if str(i) in by_id else by_id[f"{j}-{i}"]
                                                      for j, i in enumerate(r.ids.tolist())], s[0])
            except Exception as e:  # noqa: BLE001
                checks[f"n{n}"] = f"error: {e}"
        results["triton_score_relative_error_vs_ort_cpu_raw"] = checks
        log(f"triton score checks: {checks}")
        results["client_serialization"] = {str(n): triton.client_serialization_ms(pools[n][0]) for n in args.sizes
                                           if n <= 100}
        for n in args.sizes:
            for c in args.concurrency:
                if n >= 1000 and c > 1:  # 250 MB a request: one at a time
                    continue

                def go(n=n, c=c):
                    before = triton.snapshot(url)
                    out = harness.closed_loop(triton.amc_client_worker(url, pools[n]), concurrency=c,
                                              duration_s=args.duration_s, items_per_call=n)
                    out["steps"] = triton.breakdown(before, triton.snapshot(url))
                    return out
                measure(f"triton_amc n{n} c{c}", go, results=m, key=f"triton_amc|{n}|c{c}", budget=budget, need_s=10)
    results["total_s"] = round(args.budget_s - budget.left(), 1)
    return results


def _flat(repo: Path, v: str, workdir: Path) -> Path:
    """A directory with <model>/model.onnx links for the in-process runner (the repository's version dirs)."""
    d = workdir / "flat"
    for name in (s.model_name for s in sig.NETWORKS):
        (d / name).mkdir(parents=True, exist_ok=True)
        link = d / name / "model.onnx"
        if not link.exists():
            link.symlink_to(repo / name / v / "model.onnx")
    return d


# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu",), default="cpu",
                        help="the CPU only (serving on a GPU: bash benchmarks/gpu.sh)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100], help="candidates per query")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--duration-s", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop measuring after this long")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--gallery", choices=("corpus", "synthetic"), default="corpus")
    parser.add_argument("--gallery-size", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
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
