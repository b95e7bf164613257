"""``benchmarks.search_gpu``'s served figures are each their own measurement (no GPU, no tritonserver).

The first H100 run of the A/B reported the same perf_analyzer figures for four variants: the PyPI wheel's
``perf_analyzer`` script exits 0 even when the measurement failed, and ``benchmarks.perf.sweep`` then read the CSV
that an earlier variant had left at the same path. A fake perf_analyzer here behaves as that script does (exit 0,
no CSV after "Failed to obtain stable measurement"), and the A/B is built from points with distinct figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from benchmarks import perf
from benchmarks.search_report import summarize

HEADER = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
          "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,"
          "Avg latency,request/response,response wait")

# Each call takes the next answer of plan.json: a throughput (a stable measurement: the CSV is written) or null
# (unstable: perf_analyzer's message, no CSV, and exit 0 as the wheel's console script returns).
FAKE = '''#!{python}
import json, sys
from pathlib import Path
args = sys.argv[1:]
state = Path({state!r})
plan = json.loads(state.read_text())
qps = plan["answers"].pop(0)
plan["calls"].append({{"interval": args[args.index("--measurement-interval") + 1],
                      "warmup": args[args.index("--warmup-request-count") + 1]
                      if "--warmup-request-count" in args else None}})
state.write_text(json.dumps(plan))
if qps is None:
    print("Failed to obtain stable measurement within 4 measurement windows for concurrency 4.")
    print("Failed to obtain stable measurement.", file=sys.stderr)
    sys.exit(0)
Path(args[args.index("-f") + 1]).write_text({header!r} + "\\n" + f"4,{{qps}},1,2,3,4,5,6,7,8000,9000,9500,9900,8500,0,0\\n")
'''


@pytest.fixture
def fake_perf(tmp_path, monkeypatch):
    state = tmp_path / "plan.json"
    exe = tmp_path / "perf_analyzer"
    exe.write_text(FAKE.format(python=sys.executable, state=str(state), header=HEADER))
    exe.chmod(0o755)
    monkeypatch.setattr(perf, "binary", lambda: str(exe))
    monkeypatch.setattr(perf, "snapshot", lambda url: {})

    def run(answers: list, data: Path, interval_ms: int = 800) -> tuple[dict, list]:
        state.write_text(json.dumps({"answers": answers, "calls": []}))
        point = perf.sweep("localhost:1", "amc_search", data, [4], 100, tmp_path, interval_ms=interval_ms,
                           log=lambda msg: None)[0]
        return point, json.loads(state.read_text())["calls"]
    return run


def test_a_failed_call_after_a_measured_one_is_a_failure_not_the_earlier_figures(fake_perf, tmp_path):
    data = tmp_path / "search-base-100.json"  # the same data (and so CSV) path for both calls: the stale-file case
    first, _ = fake_perf([1000.0], data)
    assert first["queries_per_s"] == 1000.0 and first["candidates_per_s"] == 100_000.0
    second, calls = fake_perf([None, None], data)
    assert "candidates_per_s" not in second and "queries_per_s" not in second  # not the first call's 1000
    assert first["p99_ms"] == pytest.approx(9.9) and first["measurement_interval_ms"] == 800
    assert second["unstable"] and "Failed to obtain stable measurement" in second["error"]
    # retried once, with twice the interval, each with a warm-up at the concurrency
    assert [c["interval"] for c in calls] == ["800", "1600"] and all(int(c["warmup"]) >= 4 for c in calls)


def test_an_unstable_measurement_is_retried_once_with_a_longer_interval(fake_perf, tmp_path):
    point, calls = fake_perf([None, 1234.0], tmp_path / "search-no_graph-100.json")
    assert point["queries_per_s"] == 1234.0 and point["measurement_interval_ms"] == 1600 and len(calls) == 2


def test_each_ab_row_pairs_the_two_variants_own_points():
    def pt(rate):
        return {"concurrency": 16, "candidates_per_s": rate, "p99_ms": rate / 1000}

    failed = {"concurrency": 64, "error": "exit 2: Failed to obtain stable measurement."}
    variants = {"base_n100": failed, "base_n1000": pt(1000.0),
                "host_arrays": {"settings": {}, "n100": pt(31.0), "n1000": pt(3000.0)},
                "no_graph": {"settings": {}, "n100": pt(32.0), "n1000": pt(2000.0)},
                "one_thread": {"settings": {}, "n100": failed, "n1000": pt(5000.0)},
                "delay_0": {"settings": {}, "n100": pt(34.0), "n1000": pt(4000.0)}}
    s = summarize({"served": {"base": {"settings": {"instances": 2}}, "variants": variants}})
    rows = {a["lever"]: (a["off"], a["on"]) for a in s["ab"] if "best point" not in a["lever"]}
    assert rows == {"io_binding (no CUDA graphs), n100 c16": (31.0, 32.0),
                    "io_binding (no CUDA graphs), n1000 c16": (3000.0, 2000.0),
                    "cuda_graph, n1000 c16": (2000.0, 1000.0),
                    "one intra-op thread, n1000 c16": (1000.0, 5000.0),
                    "dynamic batching delay 0 -> base, n1000 c16": (4000.0, 1000.0)}
    assert set(s["failed"]) == {"base_n100", "one_thread n100"}


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_ab_variant_differs_from_the_base(device):
    """Each variant is one lever away from the base (the run that found onnxruntime's own pool best served the base
    a second time as ``ort_threads``). On the CPU the base has no CUDA graphs, so no_graph is the base again there:
    the "on" side of the io_binding lever, measured in the variants' turn."""
    from benchmarks.search_gpu import variants

    settings = variants(argparse.Namespace(device=device, instances=[1, 2, 4]))
    base = settings.pop("base")
    levers = {tag: s for tag, s in settings.items() if not (device == "cpu" and tag == "no_graph")}
    assert all(s != base for s in levers.values()), levers
    assert len({json.dumps(s.__dict__, sort_keys=True) for s in levers.values()}) == len(levers)
