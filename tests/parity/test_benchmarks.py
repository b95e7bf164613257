"""The benchmark suite in-process: the candidate store's correctness (store-path scores equal raw-path scores for the
same candidates, and the fused graphs and PyTorch agree), the workloads, and the ORT ceiling end to end at a tiny
size (through a real tritonserver: tests/integration/test_benchmarks.py; the suite's plain code:
tests/unit/test_benchmarks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import floor, inprocess, triton
from benchmarks.workloads import make_requests


def _flat(repo, version, tmp_path, store):
    from benchmarks.run import _flat as flat

    return flat(repo, str(version), tmp_path, store=store)


def test_store_scores_equal_raw_scores_in_process(bench_repo, trained, tmp_path):
    repo, version, gallery = bench_repo
    raw_feeds = inprocess.TextFeeds(repo, version, "cpu")
    store_feeds = inprocess.TextFeeds(repo, version, "cpu", store=True)
    raw = inprocess.OrtPipeline(_flat(repo, version, tmp_path, False), raw_feeds, "cpu")
    store = inprocess.OrtPipeline(_flat(repo, version, tmp_path, True), store_feeds, "cpu")
    fused = inprocess.OrtFused(repo / "amc_fused" / str(version) / "model.onnx", raw_feeds, "cpu")
    fused_store = inprocess.OrtFused(repo / "amc_fused_store" / str(version) / "model.onnx", store_feeds, "cpu")
    torch_runner = inprocess.TorchRunner(trained.checkpoint, raw_feeds, "cpu")
    for requests in (make_requests(gallery, 7, count=3), make_requests(gallery, 100, count=2)):
        expected = raw(requests)
        for runner in (store, fused, fused_store, torch_runner):
            got = runner(requests)
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_workloads_and_perf_input_data(bench_repo, trained, tmp_path):
    import json

    from benchmarks import perf
    from benchmarks.workloads import collection_words, synthetic_gallery

    words = collection_words(trained.checkpoint)
    gallery = synthetic_gallery(words, size=20, queries=5)
    assert len(gallery) == 20 and all(1 <= len(k) <= 6 and all(k) for k in gallery.keywords)
    assert all(w in words for q in gallery.queries for w in q.split())
    repo, version, corpus_gallery = bench_repo
    requests = make_requests(corpus_gallery, 5, count=2)
    for kind, feeds in (("raw", None), ("store", None), ("fused", inprocess.TextFeeds(repo, version, "cpu")),
                        ("fused_store", inprocess.TextFeeds(repo, version, "cpu", store=True))):
        rows = json.loads(perf.input_data(requests, kind, tmp_path / f"{kind}.json", feeds).read_text())["data"]
        signature = {"raw": triton.sig.ENSEMBLE, "store": triton.sig.STORE_ENSEMBLE, "fused": triton.sig.FUSED,
                     "fused_store": triton.sig.FUSED_STORE}[kind]
        assert len(rows) == 2 and set(rows[0]) == {s.name for s in signature.inputs if not s.optional}, kind
    with pytest.raises(ValueError, match="text step"):
        perf.input_data(requests, "fused", tmp_path / "x.json")


def test_ort_ceiling_on_cpu_at_a_tiny_size(trained, tmp_path):
    """benchmarks.ort_ceiling end to end on the CPU (no Triton, fp32 only): parity, sweep, floor and summary keys."""
    import json

    from benchmarks import ort_ceiling

    out = tmp_path / "out"
    assert ort_ceiling.main(["--device", "cpu", "--checkpoint", str(trained.checkpoint), "--out", str(out),
                             "--sizes", "5", "--threads", "1", "2", "--batches", "1", "2", "--precisions", "fp32",
                             "--duration-s", "0.05", "--gallery-size", "20", "--pool", "4", "--check-requests", "2",
                             "--e2e-configs", "1x1", "--e2e-top", "0", "--cuda-graph-batches", "1",
                             "--cuda-graph-threads", "1", "--triton-config", "none", "--budget-s", "300"]) == 0
    results = json.loads((out / "ort_ceiling.json").read_text())
    assert results["parity"]["fp32"]["holds"]
    assert {p["threads"] for p in results["ort_graph"]} >= {1, 2} and all("error" not in p for p in results["ort_graph"])
    row = results["summary"]["n5"]
    assert row["ort_ceiling_candidates_per_s"] > 0 and row["floor_candidates_per_s"] > 0
    assert row["ensemble_best_candidates_per_s"] is None  # no Triton in this test
    assert results["ort_e2e"] and (out / "ort_ceiling.md").exists()
    cost = floor.store_candidate_cost(hidden=128, keywords=6)
    assert cost["device_bytes"] > cost["stored_bytes"] > 49 * 128 * 4
