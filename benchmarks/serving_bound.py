"""What the serving machinery allows apart from the graph: the store ensemble against itself with a free graph.

    python -m benchmarks.serving_bound --checkpoint runs/amc/checkpoint.pt --out $OUT [--config 4:4]
        [--cost-concurrency 8 32] [--concurrency 100=1,32,64,128,256 1000=1,8,16,32] [--client-batch 8]
        [--budget-s 540]

Issue 10 asks the ensemble for 2,000,000 candidates/s at 100 candidates per query (20,000 queries/s) and for 0.8x
the in-process ceiling. Runs 6 and 7 (``reports/gpu.md``) put the limit in the Python backend's cost per request,
not in the graph. This measures that directly. One tritonserver per graph serves the python-flavour store path
(``--config`` instances of the text step and the graph step), and each of these targets is measured at each size:

- ``ensemble``: ``amc_store_fused`` as ``benchmarks.store_models`` builds it (query string and candidate ids in:
  text step, then graph step);
- ``ensemble_b8``: the same with 8 queries per request (``--client-batch``), as ``AMCClient.rank_many`` sends
  them: the per-request costs shared by 8 queries;
- ``graph_step``: ``amc_fused_store`` alone, fed the query's tokens and numbered words (what the text step would
  send it), i.e. one Python step instead of two.

Each is measured with the real graph (``real``), then with the graph step's session call replaced by
``benchmarks/null_graph_step.py`` (``null``), which does everything else the step does and answers zeros of the
real output shapes. Two measurements per target:

- **CPU cost** (anywhere): closed loops of ``--cost-concurrency`` tritonclient threads; the CPU time of
  tritonserver and its stub processes (``/proc``; the client's is not counted) per request and per query, and each
  step's mean batch. ``null``'s cost is what the serving machinery spends per request whatever the graph costs:
  a machine's cores divided by it bound the requests/s this design can serve there.
- **perf_analyzer sweeps** (the GPU machine only; it needs glibc 2.38): throughput and latency per concurrency,
  every output asked for, with Triton's per-step statistics.

Writes ``serving_bound.json`` and ``serving_bound.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import harness, perf, triton
from .ort_ceiling import _concurrency, _triton_config, id_requests
from .run import DEFAULT_CHECKPOINT, gpu_memory_mib, log
from .store_fused import best, serving_store_fused
from .store_signatures import FUSED_STORE
from .workloads import collection_words, synthetic_gallery

GRAPH_STEP = FUSED_STORE.model_name
NULL_STEP = Path(__file__).with_name("null_graph_step.py")


def use_null_graph(repo: Path, version: int) -> None:
    """Swap ``amc_fused_store``'s model.py for the null graph step (the real one kept beside it, which it loads)."""
    here = repo / GRAPH_STEP / str(version)
    shutil.copy(here / "model.py", here / "amc_graph_runner.py")
    shutil.copy(NULL_STEP, here / "model.py")


def targets(args) -> list[tuple[str, str, int]]:
    """(label, model, queries per request) in the order measured: the ensemble first, as clients call it."""
    out = [("ensemble", triton.STORE_FUSED, 1)]
    out += [(f"ensemble_b{b}", triton.STORE_FUSED, b) for b in args.client_batch if b > 1]
    return out + [("graph_step", GRAPH_STEP, 1)]


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by tritonserver ``pid`` and its Python-backend stub processes."""
    from serving.faults import stubs

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [pid, *(s.pid for s in stubs(pid))]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return total


def _requests(stats: dict[str, dict[str, int]], model: str) -> int:
    return sum(row["requests"] for key, row in stats.items() if key.split(":")[0] == model)


def settled_snapshot(url: str, model: str, *, at_least: int = 0, timeout_s: float = 3.0) -> dict:
    """Triton's statistics once ``model``'s request count has reached ``at_least`` and stopped changing: Triton
    records a request's statistics as it finishes, a moment after the client has its response, so a snapshot
    taken at once can miss the last requests of a loop (CI saw one request counted in the next window)."""
    end = time.monotonic() + timeout_s
    last = triton.snapshot(url)
    while time.monotonic() < end:
        time.sleep(0.05)
        now = triton.snapshot(url)
        if _requests(now, model) == _requests(last, model) >= at_least:
            return now
        last = now
    return last


def cpu_cost(url: str, pid: int, model: str, make_worker, n: int, batch: int, concurrency: int, args) -> dict:
    """A closed loop of ``concurrency`` tritonclient threads for ``--cost-s``; the server's CPU time (tritonserver
    and its stubs; the client's is not counted) per request and per query, and each step's mean batch (Triton's
    statistics: per-execution costs are shared by that many requests). Where the client shares the machine's cores
    (the CPU machine) the loop's throughput is the client's, but the server's CPU per request is still its own."""
    # A first loop, not counted, warms the server at this concurrency (the closed loop's own warm-up calls run one
    # at a time, unbatched); the measured loop then counts every request it sent.
    harness.closed_loop(make_worker, concurrency=concurrency, duration_s=min(1.0, args.cost_s), items_per_call=1)
    stats = settled_snapshot(url, model)
    before = server_cpu_s(pid)
    started = time.monotonic()
    loop = harness.closed_loop(make_worker, concurrency=concurrency, duration_s=args.cost_s,
                               items_per_call=n * batch, warmup_calls=0)
    used, wall = server_cpu_s(pid) - before, time.monotonic() - started
    steps = triton.breakdown(stats, settled_snapshot(url, model, at_least=_requests(stats, model) + loop["calls"]))
    if loop["errors"] or not loop["calls"]:
        raise RuntimeError(f"the CPU-cost loop at c{concurrency} had {loop['errors']} failed requests and "
                           f"{loop['calls']} answered: {loop['first_error']}")
    requests = loop["calls"]
    return {"concurrency": concurrency, "server_cpu_ms_per_request": used / requests * 1e3,
            "server_cpu_ms_per_query": used / requests / batch * 1e3, "server_cores_busy": used / wall,
            "requests": requests, "triton_requests": steps.get(model, {}).get("requests", 0),
            "mean_batch": {m: round(v["mean_batch"], 2) for m, v in steps.items()}, "closed_loop": loop}


def measure(url: str, pid: int, data: dict[int, dict[str, Path]], pools, feeds, args) -> dict:
    out: dict = {}
    for n in args.sizes:
        for label, model, batch in targets(args):
            r: dict = {"model": model, "queries_per_request": batch}
            out.setdefault(str(n), {})[label] = r
            try:
                if model == GRAPH_STEP:
                    make = triton.fused_worker(url, pools[n], feeds)
                else:
                    make = triton.store_worker(url, pools[n], model=model, queries_per_request=batch)
                if label == "ensemble":  # a tritonclient c1 loop too: the latency a single user sees
                    r["closed_loop_c1"] = harness.closed_loop(make, concurrency=1, duration_s=args.c1_s,
                                                              items_per_call=n)
                r["cpu_costs"] = [cpu_cost(url, pid, model, make, n, batch, c, args) for c in args.cost_concurrency]
                log(f"{label} n{n}: server CPU per query " + ", ".join(
                    f"{c['server_cpu_ms_per_query']:.3f} ms at c{c['concurrency']} (batch {c['mean_batch']})"
                    for c in r["cpu_costs"]))
                if perf.available():
                    levels = args.concurrency[n] if batch == 1 else args.batched_concurrency[n]
                    kind = "graph_step" if model == GRAPH_STEP else "ensemble"
                    r["perf"] = perf.sweep(url, model, data[n][kind], levels, n, args.workdir, batch=batch,
                                           interval_ms=args.perf_interval_ms, log=log, deadline=args.deadline)
                    r["best"] = best(r["perf"], args.p99_ms)
            except Exception as e:  # noqa: BLE001 - recorded; the other targets still run
                r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                log(f"{label} n{n}: FAILED {r['error']}")
    return out


def summarize(results: dict) -> dict:
    summary: dict = {}
    for graph, by_size in results.get("graphs", {}).items():
        for n, targets in by_size.items():
            for target, r in targets.items():
                b = r.get("best") or {}
                c1 = next((p for p in r.get("perf", []) if p.get("concurrency") == 1 and "p99_ms" in p), {})
                # The lowest cost of the loops: the most amortized by batching (a bound, like best).
                cost = min((c["server_cpu_ms_per_query"] for c in r.get("cpu_costs", [])), default=None)
                summary.setdefault(n, {})[f"{target}_{graph}"] = {
                    "best_candidates_per_s": b.get("candidates_per_s"), "best_concurrency": b.get("concurrency"),
                    "best_p99_ms": b.get("p99_ms"), "queries_per_s": b.get("queries_per_s"),
                    "p99_ms_c1": c1.get("p99_ms"), "p50_ms_c1": c1.get("p50_ms"),
                    "server_cpu_ms_per_query": cost,
                    # Every core of this machine serving this target and nothing else, at that cost per query.
                    "cpu_bound_candidates_per_s": None if not cost else results["cores"] * 1e3 / cost * int(n)}
    return summary


def cpu_model() -> str | None:
    """This machine's CPU as /proc/cpuinfo names it (per-request CPU costs differ between CPUs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_md(results: dict, out: Path) -> None:
    lines = [f"# Serving bound ({results['date']}, {results.get('gpu') or 'no GPU'})", "",
             f"Command: `{results['command']}`", "",
             f"Instances (text step : graph step): {results['config']}. Best = most candidates/s with p99 < "
             f"{results['p99_max_ms']} ms; c1 from perf_analyzer at concurrency 1.", "",
             "Server CPU = CPU time of tritonserver and its stubs per query, the lowest of closed loops of "
             f"{results.get('cost_concurrency')} client threads; CPU bound = this machine's {results.get('cores')} "
             f"cores ({results.get('cpu') or 'CPU not recorded'}) all serving at that cost.", "",
             "| candidates | what | graph | best cand/s | queries/s | at concurrency | p99 | c1 p50 / p99 | server CPU ms/query "
             "| CPU bound cand/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n, rows in results.get("summary", {}).items():
        for key, s in rows.items():
            target, graph = key.rsplit("_", 1)
            lines.append(f"| {n} | {target} | {graph} | {fmt(s['best_candidates_per_s'], ',.0f')} | "
                         f"{fmt(s['queries_per_s'], ',.0f')} | {fmt(s['best_concurrency'], 'd')} | {fmt(s['best_p99_ms'], '.1f')} | "
                         f"{fmt(s['p50_ms_c1'], '.2f')} / {fmt(s['p99_ms_c1'], '.2f')} | "
                         f"{fmt(s['server_cpu_ms_per_query'], '.3f')} | {fmt(s['cpu_bound_candidates_per_s'], ',.0f')} |")
    lines += ["", "CPU-cost loops (mean batch: queries per execution of each step, from Triton's statistics):", "",
              "| candidates | what | graph | clients | server CPU ms/request | ms/query | cores busy | mean batch |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for graph, by_size in results.get("graphs", {}).items():
        for n, targets in by_size.items():
            for target, r in targets.items():
                for c in r.get("cpu_costs", []):
                    batches = ", ".join(f"{m} {b}" for m, b in c["mean_batch"].items())
                    lines.append(f"| {n} | {target} | {graph} | {c['concurrency']} | "
                                 f"{c['server_cpu_ms_per_request']:.3f} | {c['server_cpu_ms_per_query']:.3f} | "
                                 f"{c['server_cores_busy']:.2f} | {batches} |")
    lines += ["", "Per point (Triton's statistics: ms per execution; a step's batch is requests per execution):", "",
              "| candidates | what | graph | conc | cand/s | p99 | graph step batch | infer | output | input | "
              "text step batch | infer |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for graph, by_size in results.get("graphs", {}).items():
        for n, targets in by_size.items():
            for target, r in targets.items():
                for p in r.get("perf", []):
                    if "p99_ms" not in p:
                        lines.append(f"| {n} | {target} | {graph} | {p.get('concurrency')} | error: "
                                     f"{p.get('error', '')[:80]} |")
                        continue
                    g = p["steps"].get(GRAPH_STEP, {})
                    t = p["steps"].get("amc_store_tokenizer", {})
                    lines.append(f"| {n} | {target} | {graph} | {p['concurrency']} | {p['candidates_per_s']:,.0f} | "
                                 f"{p['p99_ms']:.1f} | {g.get('mean_batch', 0):.1f} | {g.get('compute_infer_ms', 0):.2f} | "
                                 f"{g.get('compute_output_ms', 0):.2f} | {g.get('compute_input_ms', 0):.2f} | "
                                 f"{t.get('mean_batch', 0):.1f} | {t.get('compute_infer_ms', 0):.2f} |")
    (out / "serving_bound.md").write_text("\n".join(lines) + "\n")


def report_entry(runs: list[dict]) -> dict[str, dict]:
    """Server CPU ms per query of each target, one figure per run (``serving_bound.json`` files; None where a run
    has none), by graph and size: what ``reports/gpu.json`` keeps under ``serving_machinery_cpu`` (a test checks
    that it still does). Targets are named as there: ``ensemble_b8`` -> ``ensemble_8_queries_per_request``."""
    def name(target: str) -> str:
        if target.startswith("ensemble_b"):
            return f"ensemble_{target.removeprefix('ensemble_b')}_queries_per_request"
        return "graph_step_alone" if target == "graph_step" else target

    def figure(run: dict, n: str, key: str) -> float | None:
        value = run["summary"].get(n, {}).get(key, {}).get("server_cpu_ms_per_query")
        return None if value is None else round(value, 3)

    out: dict[str, dict] = {}
    for graph in ("null", "real"):
        for n in runs[0]["summary"]:
            targets = [k.rsplit("_", 1)[0] for k in runs[0]["summary"][n] if k.endswith(f"_{graph}")]
            out.setdefault(graph, {})[f"n{n}"] = {name(t): [figure(r, n, f"{t}_{graph}") for r in runs]
                                                  for t in targets}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--out", type=Path, default=Path("reports/serving_bound"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--config", default="4:4", help="TOK:FUSED instances of the text step and the graph step")
    parser.add_argument("--graphs", nargs="+", default=["real", "null"], choices=("real", "null"))
    parser.add_argument("--concurrency", nargs="+", default=["100=1,32,64,128,256", "1000=1,8,16,32"])
    parser.add_argument("--client-batch", type=int, nargs="*", default=[8],
                        help="also measure the ensemble with this many queries per request (rank_many)")
    parser.add_argument("--batched-concurrency", nargs="+", default=["100=4,8,16,32", "1000=2,4,8"])
    parser.add_argument("--budget-s", type=float, default=540.0, help="sweeps stop starting new points after this")
    parser.add_argument("--cost-concurrency", type=int, nargs="+", default=[8, 32],
                        help="client threads of the CPU-cost loops, one loop each")
    parser.add_argument("--cost-s", type=float, default=5.0, help="seconds of each CPU-cost loop")
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument("--c1-s", type=float, default=2.0)
    parser.add_argument("--perf-interval-ms", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=64, help="distinct requests per size")
    parser.add_argument("--gallery-size", type=int, default=2000)
    args = parser.parse_args(argv)
    args.concurrency = _concurrency(args.concurrency)
    args.batched_concurrency = _concurrency(args.batched_concurrency)
    for flag, levels in (("--concurrency", args.concurrency), ("--batched-concurrency", args.batched_concurrency)):
        missing = [n for n in args.sizes if n not in levels]
        if missing:
            parser.error(f"{flag} names no levels for size(s) {missing}")
    # real first: the null run swaps the graph step's model.py in the shared repository, for good.
    graphs = [g for g in ("real", "null") if g in args.graphs]
    tok, fused, _ = _triton_config(args.config)
    if not perf.available():
        log("perf_analyzer is not on PATH (it runs on the GPU machine only): server CPU cost per request only")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    args.deadline = t0 + args.budget_s

    from .inprocess import TextFeeds

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "command": " ".join(["python -m benchmarks.serving_bound", *(argv or sys.argv[1:])]),
                     "gpu": gpu_memory_mib().get("name"), "checkpoint": str(args.checkpoint), "config": args.config,
                     "p99_max_ms": args.p99_ms, "cores": len(os.sched_getaffinity(0)), "cpu": cpu_model(),
                     "cost_concurrency": args.cost_concurrency, "perf_analyzer": perf.available(), "graphs": {}}
    path = args.out / "serving_bound.json"

    def save() -> None:
        results["elapsed_s"] = round(time.monotonic() - t0, 1)
        results["summary"] = summarize(results)
        path.write_text(triton.dump(results))

    try:
        gallery = synthetic_gallery(collection_words(args.checkpoint), size=args.gallery_size)
        args.workdir = Path(tempfile.mkdtemp(prefix="amc-serving-bound-"))
        repo, version = triton.build_repository(args.workdir, args.checkpoint, gallery, log=log)
        pools = {n: id_requests(gallery, n, args.pool) for n in args.sizes}
        feeds = TextFeeds(repo, version, "cpu", store=True)
        data = {n: {"ensemble": perf.input_data(pools[n], "store", args.workdir / f"data-store-{n}.json"),
                    "graph_step": perf.input_data(pools[n], "fused_store", args.workdir / f"data-graph-{n}.json",
                                                  feeds=feeds)}
                for n in args.sizes}
        log(f"repository built in {time.monotonic() - t0:.0f} s")
        for graph in graphs:
            if graph == "null":
                use_null_graph(repo, version)
            served: dict = {}
            with serving_store_fused(repo, args.workdir, tok, fused, served) as url:
                results["graphs"][graph] = measure(url, served["server_pid"], data, pools, feeds, args)
            results.setdefault("servers", {})[graph] = served
            save()
    finally:
        save()
        write_md(results, args.out)
        log(f"summary: {json.dumps(results['summary'], indent=1, default=float)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
