"""The benchmark suite through a real tritonserver: the store ensembles the benchmarks build into their own
repository (``benchmarks.store_models``) equal the raw ensemble, and a direct caller of the fused store graph who
repeats a query word is refused (in-process: tests/parity/test_benchmarks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from amc_contract import signatures as sig
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


