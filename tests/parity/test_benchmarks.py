"""The benchmark suite in-process: the candidate store's correctness (store-path scores equal raw-path scores for the
same candidates, and the fused graphs and PyTorch agree) and the workloads (through a real tritonserver:
tests/integration/test_benchmarks.py; the suite's plain code: tests/unit/test_benchmarks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from amc_contract import signatures as sig
from benchmarks import inprocess, store_models, triton
from benchmarks import store_signatures as bench_sig
from benchmarks.workloads import make_requests
from export.configs import STEPS, parse_config


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


def test_a_store_graph_off_the_raw_path_is_caught(tmp_path):
    """The benchmarks' store graphs are validated against PyTorch's raw path like the search graph: a store whose
    keyword projections are off fails loudly, naming the graph."""
    from amc_contract.text import LexicalMatcher, TermWeights
    from export.onnx_export import ExportError
    from export.store import build_store
    from tests.parity.test_export import KEYWORDS, TERM_WEIGHTS, tiny_model

    rng = np.random.default_rng(0)
    regions = np.abs(rng.normal(0, 1.5, size=(12, sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM))).astype(np.float16)
    keywords = [list(rng.choice(KEYWORDS, size=int(rng.integers(1, 4)), replace=False)) for _ in range(12)]
    broken = build_store(tiny_model(), regions, keywords)
    broken.keyword_projected = broken.keyword_projected * 1.5
    with pytest.raises(ExportError, match="lan_store"):
        store_models.export_graphs(tiny_model(), broken, LexicalMatcher(TermWeights.from_json(TERM_WEIGHTS)), regions,
                                   tmp_path, version=1, fingerprint="fp")
