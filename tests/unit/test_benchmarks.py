"""The benchmark suite's code on tiny sizes (no timed assertions): harness, floors, report and the figures of
reports/gpu.json (its runners in-process: tests/parity/test_benchmarks.py; through a real tritonserver:
tests/integration/test_benchmarks.py)."""

from __future__ import annotations

import pytest

from benchmarks import floor, harness, report


def test_harness_and_report_on_tiny_runs(tmp_path):
    out = harness.closed_loop(lambda w: (lambda i: sum(range(100))), concurrency=2, duration_s=0.05,
                              items_per_call=10)
    assert out["calls"] > 0 and out["errors"] == 0 and out["p99_ms"] >= out["p50_ms"]
    # Rates as floor.measure_cpu() reports them (it measures for seconds): a copy reads and writes, so memory moves
    # at half the copy rate.
    floors = floor.floors(100, {"memory_copy_gb_s": 20.0, "matmul_fp32_tflop_s": 0.5})
    assert floors["raw"]["bytes"] == 100 * 49 * 1280 * 4 and floors["store"]["flops"] < floors["raw"]["flops"]
    assert floors["raw"]["bytes_ms"] == pytest.approx(floors["raw"]["bytes"] / 10e9 * 1e3)
    assert floors["raw"]["flops_ms"] == pytest.approx(floors["raw"]["flops"] / 0.5e12 * 1e3)
    assert floors["raw"]["floor_ms"] == max(floors["raw"]["bytes_ms"], floors["raw"]["flops_ms"])
    results = {"device": "cpu", "date": "d", "host": "h", "cpus": 2, "sizes": [100], "duration_s": 0.05,
               "gallery": {}, "onnxruntime": "x", "rates": {}, "floors": {}, "measurements": {
                   "triton_amc|100|c1": {**out, "steps": {}}, "ort|100|b1|c1": out}}
    report.write(results, tmp_path)
    assert (tmp_path / "serving_cpu.json").exists() and "triton_amc" in (tmp_path / "serving.md").read_text()


def test_readme_gpu_table_is_generated_from_gpu_json(tmp_path):
    """docs/gpu.md's GPU figures are reports/gpu.json's (issue 10): a stale block fails here; a page without the
    markers is an error, not a silent no-op."""
    from benchmarks import readme_gpu

    assert readme_gpu.main(["--check"]) == 0
    readme = readme_gpu.PAGE.read_text(encoding="utf-8")
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace(readme_gpu.END, "| 100 | 99,999,999 | typed by hand |\n" + readme_gpu.END))
    assert readme_gpu.main(["--check", "--readme", str(stale)]) == 1
    assert readme_gpu.main(["--readme", str(stale)]) == 0 and stale.read_text(encoding="utf-8") == readme
    with pytest.raises(ValueError, match="no generated GPU block"):
        readme_gpu.render("# a README\n", {})
    # a run without any point under the latency bound has null figures: a dash, not a crash
    empty = {"ensemble_best_candidates_per_s": None, "ensemble_best_p99_ms": None, "ensemble_p99_ms_c1": 9.2,
             "ort_ceiling_candidates_per_s": 6.4e6, "ensemble_over_ort_ceiling": None, "runs": []}
    assert "| 100 | - (-) |  | 9.2 ms | 6,400,000 | - | 2,000,000 |" in readme_gpu.table({"n100": empty})
