"""The benchmark suite through a real tritonserver: the store ensembles the benchmarks build into their own
repository (``benchmarks.store_models``) equal the raw ensemble, and the serving-bound
measurement's null graph and end-to-end run (in-process: tests/parity/test_benchmarks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from amc_client import signatures as sig
from benchmarks import inprocess, triton
from benchmarks import store_signatures as bench_sig
from benchmarks.workloads import make_requests


def test_store_ensemble_equals_raw_ensemble_through_tritonserver(bench_repo):
    from serving.server import TritonServer

    repo, version, gallery = bench_repo
    requests = make_requests(gallery, 9, count=2)
    models = triton.model_names(version)
    assert triton.STORE_FUSED in models
    with TritonServer(repo, models=models) as server:
        triton.wait_models(server.grpc_url, models)
        feeds = inprocess.TextFeeds(repo, version, "cpu", store=True)
        for r in requests:
            ranked = triton.amc_client_worker(server.grpc_url, [r])(0)(0)
            by_id = {x.candidate_id: x.score for x in ranked}
            raw = np.array([by_id[str(i)] if str(i) in by_id else by_id[f"{j}-{i}"]
                            for j, i in enumerate(r.ids.tolist())])
            for model in (bench_sig.STORE_ENSEMBLE_NAME, triton.STORE_FUSED):
                store = triton.store_worker(server.grpc_url, [r], model=model)(0)(0)[0]
                np.testing.assert_allclose(store, raw, rtol=1e-4, atol=1e-5)
            fused = triton.fused_worker(server.grpc_url, [r], feeds)(0)(0).as_numpy(sig.SCORES.name)[0]
            np.testing.assert_allclose(fused, raw, rtol=1e-4, atol=1e-5)
        _repeated_query_word_is_refused(server.grpc_url)


def _repeated_query_word_is_refused(url: str) -> None:
    """The fused store graph's lexical match scatters the query's word weights by word number, so a repeated number
    would count once: a direct caller of amc_fused_store who repeats one gets INVALID_ARGUMENT naming it, and the
    same request without the repeat is answered."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from serving.faults import raw_inputs

    tokens = np.zeros((1, 16), dtype=np.int64)
    tokens[0, :3] = [101, 4937, 102]  # [CLS] cat [SEP]
    request = {sig.QUERY_TOKENS.name: tokens,
               sig.QUERY_WORDS.name: np.array([[5, 9, 5, -1, -1, -1, -1, -1]], dtype=np.int64),
               sig.QUERY_WORD_WEIGHTS.name: np.array([[1.0, 2.0, 3.0, 0, 0, 0, 0, 0]], dtype=np.float32),
               sig.CANDIDATE_IDS.name: np.array([[0, 1, 2]], dtype=np.int64)}
    with grpcclient.InferenceServerClient(url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer(bench_sig.FUSED_STORE.model_name, raw_inputs(request), client_timeout=60)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "query_words[0] repeats 5; each value may appear once" in info.value.message()
        request[sig.QUERY_WORDS.name][0, 2] = 7
        answer = client.infer(bench_sig.FUSED_STORE.model_name, raw_inputs(request), client_timeout=60)
        assert answer.as_numpy(sig.SCORES.name).shape == (1, 3)


def test_serving_bound_null_graph_answers_the_real_shapes_with_zeros(bench_repo, tmp_path):
    """benchmarks.serving_bound's null graph step must answer what the real step answers (names, shapes, dtypes,
    the model version), or the bound it measures would be of less work than serving; after its one real call,
    zeros. Through a real tritonserver, the step alone and inside amc_store_fused."""
    import shutil

    from benchmarks import serving_bound, store_fused
    from serving.server import TritonServer

    repo, version, gallery = bench_repo
    copy = tmp_path / "repository"
    shutil.copytree(repo, copy)
    serving_bound.use_null_graph(copy, version)
    requests = make_requests(gallery, 7, count=3)
    feeds = inprocess.TextFeeds(repo, version, "cpu", store=True)
    signature = bench_sig.FUSED_STORE
    models = list(store_fused.STEP_MODELS)
    with TritonServer(repo, models=models) as real_server, TritonServer(copy, models=models) as null_server:
        for server in (real_server, null_server):
            triton.wait_models(server.grpc_url, models)
        answers = {}
        for name, server in (("real", real_server), ("null", null_server)):
            call = triton.fused_worker(server.grpc_url, requests, feeds)(0)
            results = [call(i) for i in range(3)]
            answers[name] = [{o: r.as_numpy(o) for o in signature.output_names} for r in results]
        # After its one real call: other candidate counts, and requests of 2 queries through the ensemble.
        other_n = make_requests(gallery, 4, count=2)
        ensemble = triton.store_worker(null_server.grpc_url, requests, model=triton.STORE_FUSED)(0)(1)
        pair = triton.store_worker(null_server.grpc_url, other_n, model=triton.STORE_FUSED,
                                   queries_per_request=2)(0)(0)
        direct = triton.fused_worker(null_server.grpc_url, other_n, feeds)(0)(0)
    assert pair.shape == (2, 4) and not pair.any()
    assert direct.as_numpy(sig.REGION_ATTENTION.name).shape[:2] == (1, 4)
    assert direct.as_numpy(sig.MODEL_VERSION.name).tolist() == [[version]]
    first, *later = answers["null"]
    for o in signature.output_names:
        np.testing.assert_allclose(first[o], answers["real"][0][o], rtol=1e-5)  # the one real call
        for got, want in zip(later, answers["real"][1:], strict=True):
            assert got[o].shape == want[o].shape and got[o].dtype == want[o].dtype, o
            if o == sig.MODEL_VERSION.name:
                np.testing.assert_array_equal(got[o], want[o])
            else:
                assert not got[o].any(), o
    assert ensemble.shape == answers["real"][1][sig.SCORES.name].shape and not ensemble.any()


def test_serving_bound_on_cpu_at_a_tiny_size(trained, tmp_path):
    """benchmarks.serving_bound end to end on the CPU (no perf_analyzer here): both graphs, every target, the
    server's CPU per query from /proc, each step's batch from Triton's statistics, and the report."""
    import json

    from benchmarks import serving_bound

    out = tmp_path / "out"
    assert serving_bound.main(["--checkpoint", str(trained.checkpoint), "--out", str(out), "--config", "1:1",
                               "--sizes", "5", "--concurrency", "5=1", "--batched-concurrency", "5=1",
                               "--client-batch", "2", "--cost-concurrency", "2", "--cost-s", "0.5", "--c1-s", "0.2",
                               "--gallery-size", "20", "--pool", "4"]) == 0
    results = json.loads((out / "serving_bound.json").read_text())
    assert set(results["graphs"]) == {"real", "null"}
    for graph in ("real", "null"):
        targets = results["graphs"][graph]["5"]
        assert set(targets) == {"ensemble", "ensemble_b2", "graph_step"}
        for label, r in targets.items():
            assert "error" not in r, (graph, label, r)
            (cost,) = r["cpu_costs"]
            # Every request the loop counted, and no other, reached the target (Triton's own count).
            assert cost["triton_requests"] == cost["requests"] > 0, (graph, label, cost)
            assert bench_sig.FUSED_STORE.model_name in cost["mean_batch"]
        assert targets["ensemble_b2"]["cpu_costs"][0]["mean_batch"][triton.STORE_FUSED] == 2.0
        summary = results["summary"]["5"][f"ensemble_{graph}"]
        assert summary["cpu_bound_candidates_per_s"] > 0
    assert "null" in (out / "serving_bound.md").read_text()
