"""Focused GPU measurement of the 2-step store ensemble ``amc_store_fused`` (run 3; device time is short).

    python -m benchmarks.store_fused --out $OUT [--configs 4:4 4:8] [--concurrency 128 192 256]

Publishes the checkpoint and adds the benchmarks' store models (``benchmarks.store_models``; synthetic gallery, as
``benchmarks.run --device cuda``),
then for each ``TOK:FUSED`` instance config starts a fresh tritonserver with only ``amc_store_tokenizer``,
``amc_fused_store`` and ``amc_store_fused`` loaded and measures, at 100 candidates per query:

- scores through Triton vs the fused store graph on ORT-CPU in-process (relative L2), and that a response
  with only ``scores`` + ``model_version`` carries the same scores;
- closed-loop c1 (tritonclient gRPC, all outputs): p99 at concurrency 1;
- perf_analyzer sweeps (gRPC; perf_analyzer asks for every output of the model: the honest default);
- a Python-client A/B at one concurrency (tritonclient threads): all outputs vs ``scores`` + ``model_version``
  only, on the ensemble and on ``amc_fused_store`` directly (perf_analyzer 2.60 has no flag to request a subset
  of outputs). These are client-bound figures, comparable with each other only.
Writes ``store_fused.json`` + ``store_fused.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from amc_client import signatures as sig

from . import harness, perf, triton
from .run import DEFAULT_CHECKPOINT, gpu_memory_mib, log, rel_err
from .workloads import collection_words, make_requests, synthetic_gallery

SUBSET = (sig.SCORES.name, sig.MODEL_VERSION.name)
STEP_MODELS = ("amc_store_tokenizer", "amc_fused_store", triton.STORE_FUSED)


@contextlib.contextmanager
def serving_store_fused(repo: Path, workdir: Path, tok: int, fused: int, out: dict,
                        text_provider: str = "auto") -> Iterator[str]:
    """tritonserver with the 2-step store ensemble at ``tok`` text-step and ``fused`` graph instances; yields its
    gRPC URL once every step is ready, with the start time and GPU memory recorded in ``out``. ``text_provider``:
    where the text step runs its query encoder (its ``execution_provider``: auto, cpu or cuda)."""
    from serving.server import TritonServer

    triton.set_instances(repo, "amc_store_tokenizer", tok)
    triton.set_parameter(repo, ["amc_store_tokenizer"], "execution_provider", text_provider)
    triton.set_instances(repo, "amc_fused_store", fused)
    t0 = time.monotonic()
    with TritonServer(repo, models=list(STEP_MODELS), log_file=workdir / f"tritonserver-{tok}-{fused}.log") as server:
        triton.wait_models(server.grpc_url, list(STEP_MODELS))
        out["start_s"] = round(time.monotonic() - t0, 1)
        out["server_pid"] = server.pid
        out["gpu_memory"] = gpu_memory_mib()
        yield server.grpc_url


def measure_config(repo: Path, workdir: Path, pool, feeds, tok: int, fused: int, args, ref) -> dict:
    out: dict = {"tokenizer_instances": tok, "fused_instances": fused}
    with serving_store_fused(repo, workdir, tok, fused, out) as url:
        checks = {}
        for r, s in zip(pool[:3], ref):
            full = triton.store_worker(url, [r], model=triton.STORE_FUSED)(0)(0)
            sub = triton.store_worker(url, [r], model=triton.STORE_FUSED, outputs=SUBSET)(0)(0)
            checks.setdefault("vs_ort_cpu_fused_store", []).append(rel_err(full[0], s[0]))
            checks.setdefault("subset_vs_full", []).append(rel_err(sub[0], full[0]))
        out["score_checks"] = {k: max(v) for k, v in checks.items()}
        log(f"x{tok}:{fused} score checks {out['score_checks']}")
        c1 = harness.closed_loop(triton.store_worker(url, pool, model=triton.STORE_FUSED), concurrency=1,
                                 duration_s=args.duration_s, items_per_call=100)
        out["closed_loop_c1"] = c1
        log(f"x{tok}:{fused} closed loop c1: p50 {c1['p50_ms']:.2f} p99 {c1['p99_ms']:.2f} ms")
        data = perf.input_data(pool, "store", workdir / "data-store-100.json")
        out["perf"] = (perf.sweep(url, triton.STORE_FUSED, data, args.concurrency, 100, workdir, log=log)
                       if perf.available() else [{"error": "perf_analyzer not on PATH"}])
        if args.ab_concurrency:
            ab = {}
            c = args.ab_concurrency
            for label, make in (
                    ("ensemble_all", lambda: triton.store_worker(url, pool, model=triton.STORE_FUSED)),
                    ("ensemble_scores_version", lambda: triton.store_worker(url, pool, model=triton.STORE_FUSED,
                                                                            outputs=SUBSET)),
                    ("fused_store_all", lambda: triton.fused_worker(url, pool, feeds)),
                    ("fused_store_scores_version", lambda: triton.fused_worker(url, pool, feeds,
                                                                               outputs=SUBSET))):
                before = triton.snapshot(url)
                r = harness.closed_loop(make(), concurrency=c, duration_s=args.duration_s, items_per_call=100)
                r["steps"] = triton.breakdown(before, triton.snapshot(url))
                ab[label] = r
                log(f"x{tok}:{fused} A/B {label} c{c}: {r['candidates_per_s']:.0f} cand/s p99 {r['p99_ms']:.2f} ms")
            out["python_client_ab"] = {"concurrency": c, "results": ab}
    return out


def best(points: list[dict], p99_max: float = 50.0) -> dict | None:
    ok = [p for p in points if "p99_ms" in p and p["p99_ms"] < p99_max]
    return max(ok, key=lambda p: p["candidates_per_s"]) if ok else None


def write_md(results: dict, out: Path) -> None:
    lines = [f"# amc_store_fused focused run ({results['date']}, {results.get('gpu')})", ""]
    for key, cfg in results["configs"].items():
        if "error" in cfg:
            lines += [f"## {key}: error {cfg['error']}", ""]
            continue
        c1 = cfg["closed_loop_c1"]
        lines += [f"## tokenizer x{cfg['tokenizer_instances']}, amc_fused_store x{cfg['fused_instances']}", "",
                  f"score checks {cfg['score_checks']}; closed loop c1 p50 {c1['p50_ms']:.2f} p99 {c1['p99_ms']:.2f} ms",
                  "", "| conc | cand/s | p50 | p95 | p99 | c_infer | c_output | fused batch | fused infer | fused output |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in cfg["perf"]:
            if "p99_ms" not in p:
                lines.append(f"| {p.get('concurrency')} | error: {p.get('error', '')[:80]} |")
                continue
            # Triton books each request of a batch with the whole execution's time: ms per request = ms per execution.
            f = p["steps"].get("amc_fused_store", {})
            lines.append(f"| {p['concurrency']} | {p['candidates_per_s']:,.0f} | {p['p50_ms']:.2f} | {p['p95_ms']:.2f} | "
                         f"{p['p99_ms']:.2f} | {p['server_compute_infer_ms']:.2f} | {p['server_compute_output_ms']:.2f} | "
                         f"{f.get('mean_batch', 0):.1f} | {f.get('compute_infer_ms', 0):.2f} | "
                         f"{f.get('compute_output_ms', 0):.2f} |")
        ab = cfg.get("python_client_ab")
        if ab:
            lines += ["", f"Python-client A/B (tritonclient threads, c{ab['concurrency']}; client-bound):", "",
                      "| what | cand/s | p50 | p99 | fused_store output ms/exec |", "| --- | --- | --- | --- | --- |"]
            for label, r in ab["results"].items():
                f = r["steps"].get("amc_fused_store", {})
                lines.append(f"| {label} | {r['candidates_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                             f"{f.get('compute_output_ms', 0):.2f} |")
        lines.append("")
    (out / "store_fused.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_fused", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--configs", nargs="+", default=["4:4", "4:8"], help="TOK:FUSED instance counts")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[128, 192, 256])
    parser.add_argument("--ab-concurrency", type=int, default=32, help="0: skip the Python-client A/B")
    parser.add_argument("--duration-s", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from .inprocess import OrtFused, TextFeeds

    gallery = synthetic_gallery(collection_words(args.checkpoint), size=2000)
    pool = make_requests(gallery, 100)
    workdir = Path(tempfile.mkdtemp(prefix="amc-sf-"))
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "gpu": gpu_memory_mib().get("name"),
                     "gallery": {"source": gallery.source, "images": len(gallery)}, "candidates": 100,
                     "configs": {}}
    t0 = time.monotonic()
    try:
        repo, version = triton.build_repository(workdir, args.checkpoint, gallery, log=log)
        feeds = TextFeeds(repo, version, "cpu", store=True)
        cpu = OrtFused(repo / "amc_fused_store" / str(version) / "model.onnx", feeds, "cpu")
        ref = [cpu([r]) for r in pool[:3]]
        for spec in args.configs:
            tok, fused = (int(x) for x in spec.split(":"))
            try:
                results["configs"][spec] = measure_config(repo, workdir, pool, feeds, tok, fused, args, ref)
            except Exception as e:  # noqa: BLE001
                results["configs"][spec] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                log(f"{spec}: FAILED {results['configs'][spec]['error']}")
            (args.out / "store_fused.json").write_text(triton.dump(results))
        summary = {}
        for spec, cfg in results["configs"].items():
            b = best(cfg.get("perf", []))
            summary[spec] = b and {k: b[k] for k in ("concurrency", "candidates_per_s", "p50_ms", "p99_ms")}
        results["best_p99_under_50ms"] = summary
        log(f"best with p99 < 50 ms: {summary}")
    finally:
        results["total_s"] = round(time.monotonic() - t0, 1)
        (args.out / "store_fused.json").write_text(triton.dump(results))
        write_md(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
