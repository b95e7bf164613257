"""The benchmark suite in-process: its runners agree (the exported graphs under onnxruntime and the PyTorch model, fed
by the text step's code, give the same scores), its workloads, and its repository (through a real tritonserver:
tests/integration/test_benchmarks.py; the suite's plain code: tests/unit/test_benchmarks.py)."""

from __future__ import annotations

import numpy as np

from amc_contract import signatures as sig
from benchmarks import inprocess, triton
from benchmarks.workloads import make_requests
from export.configs import STEPS


def test_onnxruntime_and_pytorch_score_alike_in_process(bench_repo, trained, tmp_path):
    from benchmarks.run import _flat

    repo, version, gallery = bench_repo
    feeds = inprocess.TextFeeds(repo, version, "cpu")
    ort = inprocess.OrtPipeline(_flat(repo, str(version), tmp_path), feeds, "cpu")
    torch_runner = inprocess.TorchRunner(trained.checkpoint, feeds, "cpu")
    for requests in (make_requests(gallery, 7, count=3), make_requests(gallery, 100, count=2)):
        expected = ort(requests)
        assert expected.shape == (len(requests), len(requests[0]))
        np.testing.assert_allclose(torch_runner(requests), expected, rtol=1e-4, atol=1e-5)


def test_workloads(trained):
    from benchmarks.workloads import collection_words, synthetic_gallery

    words = collection_words(trained.checkpoint)
    gallery = synthetic_gallery(words, size=20, queries=5)
    assert len(gallery) == 20 and all(1 <= len(k) <= 6 and all(k) for k in gallery.keywords)
    assert all(w in words for q in gallery.queries for w in q.split())


def test_the_benchmark_repository_is_a_publish(bench_repo):
    """build_repository's repository: what a publish writes without a store (amc, amc_v<N> and their steps), all of
    it served to the benchmark."""
    repo, version, _ = bench_repo
    folders = {p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert folders == set(triton.model_names(version))
    assert folders == {s.model_name for s in STEPS} | {sig.ENSEMBLE_NAME, sig.versioned_ensemble_name(version)}
