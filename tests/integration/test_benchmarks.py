"""The benchmark suite through a real tritonserver: its repository served, the client's ranking through ``amc`` equals
the in-process runner's, as ``benchmarks.run`` checks before it measures (in-process: tests/parity/test_benchmarks.py).
"""

from __future__ import annotations

import numpy as np

from benchmarks import inprocess, triton
from benchmarks.workloads import make_requests


def test_the_served_ensemble_scores_as_the_in_process_runner(bench_repo, tmp_path):
    from benchmarks.run import _flat
    from serving.server import TritonServer

    repo, version, gallery = bench_repo
    requests = make_requests(gallery, 9, count=2)
    runner = inprocess.OrtPipeline(_flat(repo, str(version), tmp_path), inprocess.TextFeeds(repo, version, "cpu"),
                                   "cpu")
    models = triton.model_names(version)
    with TritonServer(repo, models=models) as server:
        triton.wait_models(server.grpc_url, models)
        for r in requests:
            ranked = triton.amc_client_worker(server.grpc_url, [r])(0)(0)
            by_id = {x.candidate_id: x.score for x in ranked}
            served = np.array([by_id[str(i)] if str(i) in by_id else by_id[f"{j}-{i}"]
                               for j, i in enumerate(r.ids.tolist())])
            np.testing.assert_allclose(served, runner([r])[0], rtol=1e-4, atol=1e-5)
