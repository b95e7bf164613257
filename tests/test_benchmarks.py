"""The benchmark suite's code on tiny sizes (no timed assertions), and the correctness of the store ensembles the
benchmarks build into their own repository (``benchmarks.store_models``): store-path scores equal raw-path scores
for the same candidates, in-process and through a real tritonserver."""

from __future__ import annotations

import numpy as np
import pytest

from amc_client import signatures as sig
from benchmarks import floor, harness, inprocess, report, store_models, triton
from benchmarks import store_signatures as bench_sig
from benchmarks.workloads import Gallery, make_requests
from export.configs import STEPS, parse_config, to_text


@pytest.fixture(scope="module")
def bench_repo(trained, small_corpus, tmp_path_factory):
    gallery = Gallery(small_corpus.regions[:60], small_corpus.keywords[:60],
                      [q.text for q in small_corpus.queries["test"]][:20], "corpus")
    repo, version = triton.build_repository(tmp_path_factory.mktemp("bench"), trained.checkpoint, gallery,
                                            log=lambda *_: None)
    return repo, version, gallery


def test_the_benchmark_repository_adds_its_store_models_to_a_publish(bench_repo):
    """build_repository's repository: what a publish writes (amc, amc_v<N> and their steps; no store) and the
    benchmarks' store models, each config the generator's for its signature."""
    repo, version, _ = bench_repo
    folders = {p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert folders == set(triton.model_names(version))
    assert folders >= {s.model_name for s in STEPS} | {sig.ENSEMBLE_NAME, sig.versioned_ensemble_name(version)}
    assert not {sig.SEARCH_ENSEMBLE_NAME, sig.SEARCH_STEP.model_name} & folders
    for step in bench_sig.STEPS:
        config = parse_config((repo / step.model_name / "config.pbtxt").read_text())
        assert [t.name for t in config.input] == step.input_names, step.model_name
        assert [t.name for t in config.output] == step.output_names, step.model_name
        assert (repo / step.model_name / str(version)).is_dir()
    for name in (bench_sig.STORE_ENSEMBLE_NAME, bench_sig.versioned_store_ensemble_name(version),
                 bench_sig.STORE_FUSED_ENSEMBLE_NAME):
        config = parse_config((repo / name / "config.pbtxt").read_text())
        assert {s.model_version for s in config.ensemble_scheduling.step} == {version}, name


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
        signature = {"raw": sig.ENSEMBLE, "store": bench_sig.STORE_ENSEMBLE, "fused": bench_sig.FUSED,
                     "fused_store": bench_sig.FUSED_STORE}[kind]
        assert len(rows) == 2 and set(rows[0]) == {s.name for s in signature.inputs if not s.optional}, kind
    with pytest.raises(ValueError, match="text step"):
        perf.input_data(requests, "fused", tmp_path / "x.json")


def test_harness_and_report_on_tiny_runs(tmp_path):
    out = harness.closed_loop(lambda w: (lambda i: sum(range(100))), concurrency=2, duration_s=0.05,
                              items_per_call=10)
    assert out["calls"] > 0 and out["errors"] == 0 and out["p99_ms"] >= out["p50_ms"]
    floors = floor.floors(100, floor.measure_cpu(), "cpu")
    assert floors["raw"]["bytes"] == 100 * 49 * 1280 * 4 and floors["store"]["flops"] < floors["raw"]["flops"]
    results = {"device": "cpu", "date": "d", "host": "h", "cpus": 2, "sizes": [100], "duration_s": 0.05,
               "gallery": {}, "onnxruntime": "x", "rates": {}, "floors": {}, "measurements": {
                   "triton_amc|100|c1": {**out, "steps": {}}, "ort|100|b1|c1": out}}
    report.write(results, tmp_path)
    assert (tmp_path / "serving_cpu.json").exists() and "triton_amc" in (tmp_path / "serving.md").read_text()


def test_store_configs_round_trip():
    for step in bench_sig.STEPS:
        config = store_models.store_step_config(step, "python", instances=3)
        assert parse_config(to_text(config)) == config
        assert config.instance_group[0].count == 3 and config.dynamic_batching.max_queue_delay_microseconds > 0
    with pytest.raises(ValueError, match="not one of the benchmarks' store steps"):
        store_models.store_step_config(sig.SEARCH_STEP, "python")


def test_a_store_graph_off_the_raw_path_is_caught(tmp_path):
    """The benchmarks' store graphs are validated against PyTorch's raw path like the search graph: a store whose
    keyword projections are off fails loudly, naming the graph."""
    from test_export import KEYWORDS, TERM_WEIGHTS, tiny_model

    from amc_client.text import LexicalMatcher, TermWeights
    from export.onnx_export import ExportError
    from export.store import build_store

    rng = np.random.default_rng(0)
    regions = np.abs(rng.normal(0, 1.5, size=(12, sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM))).astype(np.float16)
    keywords = [list(rng.choice(KEYWORDS, size=int(rng.integers(1, 4)), replace=False)) for _ in range(12)]
    broken = build_store(tiny_model(), regions, keywords)
    broken.keyword_projected = broken.keyword_projected * 1.5
    with pytest.raises(ExportError, match="lan_store"):
        store_models.export_graphs(tiny_model(), broken, LexicalMatcher(TermWeights.from_json(TERM_WEIGHTS)), regions,
                                   tmp_path, version=1, fingerprint="fp")


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


def test_gpu_json_serving_machinery_figures_are_the_reports_own():
    """reports/gpu.json's serving_machinery_cpu figures are those of the serving_bound files it names (typed
    figures would drift from the runs)."""
    import json
    from pathlib import Path

    from benchmarks.serving_bound import report_entry

    reports = Path(__file__).resolve().parents[1] / "reports"
    entry = json.loads((reports / "gpu.json").read_text())["serving_machinery_cpu"]
    runs = [json.loads((reports / name).read_text()) for name in entry["files"]]
    assert len(runs) >= 2 and entry["dates"] == [r["date"] for r in runs]
    assert entry["server_cpu_ms_per_query"] == report_entry(runs)


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


def test_readme_gpu_table_is_generated_from_gpu_json(tmp_path):
    """The README's GPU figures are reports/gpu.json's (issue 10): a stale block fails here; a README without the
    markers is an error, not a silent no-op."""
    from benchmarks import readme_gpu

    assert readme_gpu.main(["--check"]) == 0
    readme = (readme_gpu.ROOT / "README.md").read_text(encoding="utf-8")
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


def test_triton_config_spec_names_where_the_text_step_encodes():
    from benchmarks.ort_ceiling import _triton_config

    assert _triton_config("4:4") == (4, 4, "auto") and _triton_config("8:4:cpu") == (8, 4, "cpu")
    for bad in ("4:gpu", "0:4", "4"):
        with pytest.raises(ValueError, match="TOK:FUSED"):
            _triton_config(bad)
