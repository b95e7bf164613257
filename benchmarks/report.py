"""The CPU serving benchmark's results (``benchmarks.run``) as ``serving_cpu.json`` and ``serving.md``."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _table(m: dict, sizes: list[int]) -> list[str]:
    lines = ["| method | N | batch/conc | queries/s | candidates/s | p50 ms | p95 ms | p99 ms | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, v in m.items():
        parts = key.split("|")
        if not isinstance(v, dict):
            continue
        if "p99_ms" not in v:
            lines.append(f"| {parts[0]} | {parts[1]} | {'/'.join(parts[2:])} | {v.get('error') or v.get('skipped')} "
                         "| | | | | |")
            continue
        qps = v.get("queries_per_s", v["calls_per_s"])
        lines.append(f"| {parts[0]} | {parts[1]} | {'/'.join(parts[2:])} | {_fmt(qps)} | {_fmt(v['candidates_per_s'], 0)}"
                     f" | {_fmt(v['p50_ms'], 2)} | {_fmt(v.get('p95_ms'), 2)} | {_fmt(v['p99_ms'], 2)} | {v['errors']} |")
    return lines


def _steps(m: dict, key: str) -> list[str]:
    steps = (m.get(key) or {}).get("steps") or {}
    if not steps:
        return []
    lines = [f"Per-step Triton statistics for `{key}` (mean ms per request):", "",
             "| model | requests | mean batch | queue | compute_input | compute_infer | compute_output |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in steps.items():
        lines.append(f"| {name} | {s['requests']} | {s['mean_batch']:.2f} | {s['queue_ms']:.2f} | "
                     f"{s['compute_input_ms']:.2f} | {s['compute_infer_ms']:.2f} | {s['compute_output_ms']:.2f} |")
    return lines + [""]


def _where_the_time_goes(results: dict, n: int) -> list[str]:
    """The (a)/(b) overhead explained from this run's own numbers: client serialization and Triton's steps."""
    m = results["measurements"]
    a, b = m.get(f"triton_amc|{n}|c1"), m.get(f"ort|{n}|b1|c1")
    ser = (results.get("client_serialization") or {}).get(str(n))
    if not (a and b and ser and a.get("steps")):
        return []
    steps = a["steps"]
    ens = steps.get("amc", {})
    networks = {k: v["compute_infer_ms"] for k, v in steps.items() if k != "amc"}
    van = networks.get("amc_van", 0.0)
    client_side = ser["set_data_from_numpy_ms"] + ser["protobuf_serialize_ms"] + ser["pack_ms"]
    queue = sum(v["queue_ms"] for k, v in steps.items() if k != "amc")
    moves = ens.get("compute_input_ms", 0) + ens.get("compute_output_ms", 0) + sum(
        v["compute_input_ms"] + v["compute_output_ms"] for k, v in steps.items() if k != "amc")
    other = a["p50_ms"] - client_side - sum(networks.values()) - queue - moves
    return ["## Where the time goes ((a) Triton vs (b) in-process onnxruntime, concurrency 1)", "",
            f"(a) takes {a['p50_ms']:.0f} ms at p50 against {b['p50_ms']:.0f} ms for (b): "
            f"{a['p50_ms'] / b['p50_ms']:.2f}x. Per request, from this run's figures:", "",
            f"- the networks themselves: {sum(networks.values()):.1f} ms of compute in the steps, "
            f"{van:.1f} ms of it in VAN (the projection of {n} x 49 x 1280 region features), as in (b);",
            f"- the client turning {ser['request_bytes'] / 1e6:.0f} MB of float32 region features into a gRPC "
            f"message: {client_side:.1f} ms (protobuf serialization {ser['protobuf_serialize_ms']:.1f} ms), and "
            "the server parsing it again;",
            f"- Triton moving tensors into and out of the ensemble and its Python-backend steps (shared memory): "
            f"{moves:.1f} ms, and queueing between steps: {queue:.1f} ms;",
            f"- the rest ({other:.1f} ms): gRPC transport of the request, the server-side parse, response "
            "handling, and the client and server sharing the same 2 cores.", "",
            "So the overhead is mostly the candidate payload, not Triton's scheduling: whole-store search "
            "(`AMCClient.search`: the candidates' features held by the server, `reports/search_cpu.json`) removes it, "
            "which is the GPU work's main remedy (reports/gpu.md).",
            ""]


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    m = results["measurements"]
    sizes = results["sizes"]
    n = 100 if 100 in sizes else sizes[0]
    a = m.get(f"triton_amc|{n}|c1", {})
    b = m.get(f"ort|{n}|b1|c1", {})
    results["summary"] = {f"n{n}": {
        "triton_amc_rps_c1": a.get("calls_per_s"), "ort_rps_c1": b.get("calls_per_s"),
        "torch_rps_c1": m.get(f"torch|{n}|b1|c1", {}).get("calls_per_s"),
        "serving_overhead_latency_ratio_c1": (a["p50_ms"] / b["p50_ms"]) if a.get("p50_ms") and b.get("p50_ms")
        else None,
        "serving_overhead_throughput_ratio_c1": (b["calls_per_s"] / a["calls_per_s"])
        if a.get("calls_per_s") and b.get("calls_per_s") else None}}
    (out / "serving_cpu.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    md = [f"# Serving benchmark on the CPU ({results['date']}, host {results['host']}, {results['cpus']} CPUs)", "",
          "Written by `python -m benchmarks.run --device cpu` (`make bench`); numbers from "
          "`reports/serving_cpu.json`.", "",
          f"Gallery: {results['gallery']}; requests: real test-query texts, {sizes} corpus candidates each "
          "(regions as float32 + their keywords). Closed loop, "
          f"{results['duration_s']} s per measurement, onnxruntime {results['onnxruntime']}.", "",
          *_table(m, sizes), "", "Summary: " + json.dumps(results["summary"], default=float), "",
          f"Client-side serialization of one raw request: {json.dumps(results.get('client_serialization'))}", "",
          f"Floors (measured rates {json.dumps(results['rates'], default=float)}): "
          f"{json.dumps(results['floors'], default=float)}", "",
          f"Score checks (relative error against ORT-CPU raw path): "
          f"{json.dumps(results.get('score_relative_error_vs_ort_cpu_raw'))} "
          f"{json.dumps(results.get('triton_score_relative_error_vs_ort_cpu_raw'))}", ""]
    md += _where_the_time_goes(results, n)
    for key in (f"triton_amc|{n}|c1", f"triton_amc|{n}|c4"):
        md += _steps(m, key)
    (out / "serving.md").write_text("\n".join(md) + "\n")
