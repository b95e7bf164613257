"""Integration: a trained checkpoint, published, served by a real tritonserver, queried through the client.

Scores through Triton over gRPC must equal the PyTorch model's (relative error under 1e-4, same ranking),
with the text features computed as training computes them (``export.reference``: the PyTorch sentence encoder,
the same WordPiece ids and lexical matcher, after the same query rules). Any query with a letter, digit or emoji is
ranked, whatever its words or script (one of punctuation only is refused, naming it); every
kind of bad input gets an error naming the problem (INVALID_ARGUMENT for the caller's mistakes) while the
server keeps answering.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from amc_client import (
    AMCClient,
    AsyncAMCClient,
    Candidate,
    CandidateArrays,
    DeadlineExceededError,
    InvalidInputError,
    ModelVersionError,
    pack_request,
)
from amc_contract import signatures as sig
from amc_model.checkpoint import load_checkpoint
from export.publish import publish
from export.reference import Reference
from export.repository import STEPS
from export.store import publish_store
from serving.faults import raw_inputs
from serving.rollout import infer_arrays
from serving.server import TritonServer
from serving.supervisor import Supervisor, is_search_ensemble

TOLERANCE = 1e-4


# Whole-store search: the version also gets a candidate store of the small corpus's images, ids "s<row>".
# amc_search is one step (amc_search_step).
SEARCH_MODELS = [sig.SEARCH_STEP.model_name]


@pytest.fixture(scope="module")
def served(trained, small_corpus, tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    version = publish(trained.checkpoint, repository, log=lambda *_: None)
    ckpt = load_checkpoint(trained.checkpoint)
    publish_store(repository, version, ckpt.build_model(), ckpt.term_weights, small_corpus.regions,
                  small_corpus.keywords, ids=[f"s{g}" for g in range(len(small_corpus.regions))],
                  fingerprint=ckpt.fingerprint, instances=1, log=lambda *_: None)
    models = [s.model_name for s in STEPS] + [sig.versioned_ensemble_name(version), sig.ENSEMBLE_NAME]
    models += SEARCH_MODELS + [sig.versioned_search_ensemble_name(version), sig.SEARCH_ENSEMBLE_NAME]
    with TritonServer(repository, models=models, admin_key="test-key", log_file=os.environ.get("AMC_TEST_SERVER_LOG")) as server:
        yield server, version


@pytest.fixture(scope="module")
def client(served):
    server, _ = served
    with AMCClient(server.grpc_url, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(trained):
    return Reference(load_checkpoint(trained.checkpoint))


def corpus_candidates(corpus, count: int, offset: int = 0) -> list[Candidate]:
    images = [(offset + i) % len(corpus.chars) for i in range(count)]
    return [Candidate(id=f"img{i}", regions=corpus.regions[i].astype(np.float32), keywords=corpus.keywords[i])
            for i in images]


def pytorch_scores(reference, query: str, candidates: list[Candidate]) -> np.ndarray:
    k = max(1, max(len(c.keywords) for c in candidates))
    keywords = np.array([[list(c.keywords) + [""] * (k - len(c.keywords)) for c in candidates]], dtype=object)
    regions = np.stack([c.regions for c in candidates])[None]
    return reference([query], regions, np.ones(regions.shape[:3], dtype=bool), keywords).scores[0].numpy()


def assert_served_equals_pytorch(client, reference, query: str, candidates: list[Candidate]) -> list:
    results = client.rank(query, candidates)
    expected = pytorch_scores(reference, query, candidates)
    by_id = {r.candidate_id: r.score for r in results}
    served_scores = np.array([by_id[c.id] for c in candidates])
    error = np.linalg.norm(served_scores - expected) / np.linalg.norm(expected)
    assert error < TOLERANCE, f"relative error {error:.2e} for {query!r}, {len(candidates)} candidates"
    assert [r.candidate_id for r in results] == [candidates[i].id for i in np.argsort(-expected, kind="stable")]
    return results


def test_the_server_is_the_real_tritonserver(served):
    server, _ = served
    assert server.is_real_tritonserver()
    meta = grpcclient.InferenceServerClient(server.grpc_url).get_server_metadata(as_json=True)
    assert meta["name"] == "triton" and meta["version"].startswith("2.")


@pytest.mark.parametrize("count", [1, 7, 100])
def test_scores_and_ranking_equal_pytorch(client, small_corpus, reference, served, count):
    query = small_corpus.queries["test"][count % 5].text
    results = assert_served_equals_pytorch(client, reference, query, corpus_candidates(small_corpus, count,
                                                                                        offset=count))
    assert all(r.model_version == served[1] for r in results)
    assert all(abs(r.visual_weight + r.language_weight - 1) < 1e-5 for r in results)
    assert all(abs(float(r.region_attention.sum()) - 1) < 1e-4 for r in results)


@pytest.mark.parametrize("query", ["kiwifruit", "guardsman", "kiwifruit guardsman", "猫", "кошка",
                                   "grinning cat 😺", "😺", "?!kiwifruit"])
def test_any_query_is_ranked(client, small_corpus, reference, query):
    """Words no fixed vocabulary had, other scripts and emoji: ranked, with PyTorch's scores."""
    results = assert_served_equals_pytorch(client, reference, query, corpus_candidates(small_corpus, 20))
    assert len(results) == 20


def test_keywords_unseen_at_export_are_embedded_on_the_fly(client, small_corpus, reference, served):
    """Keywords that are not in the version's keyword table (not in the training corpus) are encoded by the
    text step's encoder when served, and score as PyTorch scores them."""
    server, version = served
    with np.load(server.repository / sig.TOKENIZER.model_name / str(version) / "keyword_table.npz") as table:
        known = set(table["texts"].tolist())
    assert known  # the table holds the training corpus's keywords
    unseen = ["kiwifruit salad", "guardsman bearskin", "猫耳", "🐱 sticker", "face"]
    candidates = [Candidate(id=c.id, regions=c.regions, keywords=[*c.keywords[:2], unseen[i % len(unseen)]])
                  for i, c in enumerate(corpus_candidates(small_corpus, 9))]
    assert not known & set(unseen[:4])
    assert_served_equals_pytorch(client, reference, "kiwifruit face", candidates)


def test_rank_many_equals_single_queries(client, small_corpus):
    queries = [q.text for q in small_corpus.queries["test"][:3]]
    sets = [corpus_candidates(small_corpus, n, offset=n) for n in (3, 9, 5)]
    batched = client.rank_many(queries, sets)
    for q, cands, got in zip(queries, sets, batched, strict=True):
        single = client.rank(q, cands)
        assert [r.candidate_id for r in got] == [r.candidate_id for r in single]
        np.testing.assert_allclose([r.score for r in got], [r.score for r in single], rtol=1e-5, atol=1e-6)


def test_async_client_matches_sync(client, served, small_corpus):
    import asyncio

    server, _ = served
    query, cands = small_corpus.queries["test"][0].text, corpus_candidates(small_corpus, 7)

    async def run():
        async with AsyncAMCClient(server.grpc_url, timeout_s=60) as c:
            return await c.rank(query, cands)

    got = asyncio.run(run())
    assert [r.candidate_id for r in got] == [r.candidate_id for r in client.rank(query, cands)]


# ---- bad input: each gets an error naming the problem, and the server still answers correctly ----------

@pytest.fixture
def still_serving(client, small_corpus, reference):
    """After the test, a good request still gets correct scores."""
    yield
    query, cands = small_corpus.queries["test"][1].text, corpus_candidates(small_corpus, 7)
    assert_served_equals_pytorch(client, reference, query, cands)


def raw_request(query=b"cat", n=2, r=3, d=sig.REGION_FEATURE_DIM, dtype=np.float32, keywords=None,
                region_mask=None) -> dict[str, np.ndarray]:
    regions = np.abs(np.random.default_rng(0).normal(size=(1, n, r, d))).astype(dtype)
    if keywords is None:
        keywords = np.full((1, n, 2), b"", dtype=object)
        keywords[..., 0] = b"cat"
    return {"query": np.array([[query]], dtype=object), "regions": regions,
            "region_mask": np.ones((1, n, r), bool) if region_mask is None else region_mask,
            "keywords": keywords}


def send_raw(server, arrays: dict[str, np.ndarray]):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    return client.infer(sig.ENSEMBLE_NAME, raw_inputs(arrays), client_timeout=60)


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_empty_queries_are_invalid_arguments(client, served, small_corpus, query):
    with pytest.raises(InvalidInputError, match="INVALID_ARGUMENT.*query is empty"):
        client.rank(query, corpus_candidates(small_corpus, 3), validate=False)
    with pytest.raises(InferenceServerException, match="query is empty") as info:
        send_raw(served[0], raw_request(query=query.encode()))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize("query", ["?!", " ... ", "_-_"])
def test_a_query_of_punctuation_only_is_an_invalid_argument(client, served, small_corpus, query):
    """Text rules 2: nothing is left once the query is normalized. The client does not refuse it itself (a version of
    rules 1 ranks it); the server names it, on the ranking and the search ensembles alike."""
    message = f"INVALID_ARGUMENT.*query {re.escape(repr(query))} normalizes to nothing"
    with pytest.raises(InvalidInputError, match=message):
        client.rank(query, corpus_candidates(small_corpus, 3))
    with pytest.raises(InvalidInputError, match=message):
        client.search(query, top_k=3)
    with pytest.raises(InferenceServerException, match="normalizes to nothing") as info:
        send_raw(served[0], raw_request(query=query.encode()))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize(("typed", "clean"), [("🐱", "cat face"), ("thumbs_up", "thumbs up"),
                                              ("Thumbs Up!!", "thumbs up"), ("🇯🇵", "flag: Japan")])
def test_queries_as_people_type_them_rank_as_their_clean_form(client, small_corpus, typed, clean):
    """An emoji is read as its CLDR name, and case, underscores and punctuation do not count: the same ranking and
    scores, through the whole-store search and the re-ranking ensemble."""
    searched = client.search(typed, top_k=10)
    expected = client.search(clean, top_k=10)
    assert [r.store_row for r in searched] == [r.store_row for r in expected]
    np.testing.assert_allclose([r.score for r in searched], [r.score for r in expected], rtol=1e-6)
    cands = corpus_candidates(small_corpus, 12)
    ranked, clean_ranked = client.rank(typed, cands), client.rank(clean, cands)
    assert [r.candidate_id for r in ranked] == [r.candidate_id for r in clean_ranked]
    np.testing.assert_allclose([r.score for r in ranked], [r.score for r in clean_ranked], rtol=1e-6)


def test_the_published_version_carries_its_text_rules(served):
    """Both text steps of the version (the ranking's and the search step) declare the checkpoint's rules and hold the
    emoji names they normalize with; the manifest says the rules too."""
    import json

    from amc_contract.text import TEXT_RULES, load_emoji_names
    from export.publish import read_manifest
    from training.corpus.catalog import emoji_names

    server, version = served
    for step in (sig.TOKENIZER, sig.SEARCH_STEP):
        folder = server.repository / step.model_name / str(version)
        assert json.loads((folder / "version.json").read_text()) == {"version": version, "text_rules": TEXT_RULES}
        assert load_emoji_names((folder / "emoji_names.json").read_text(encoding="utf-8")) == emoji_names()
    assert read_manifest(server.repository, version)["text_rules"] == TEXT_RULES == 2


@pytest.mark.usefixtures("still_serving")
def test_empty_candidate_set(client, served):
    with pytest.raises(InvalidInputError, match="empty"):
        client.rank("cat", [])
    with pytest.raises(InferenceServerException, match="candidate set is empty") as info:
        send_raw(served[0], raw_request(n=0))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.usefixtures("still_serving")
def test_too_many_candidates(served):
    with pytest.raises(InferenceServerException, match=f"maximum of {sig.MAX_CANDIDATES}") as info:
        send_raw(served[0], raw_request(n=sig.MAX_CANDIDATES + 1, r=1))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.usefixtures("still_serving")
def test_wrong_region_shape_and_dtype(client, served):
    with pytest.raises(InferenceServerException, match="regions"):
        send_raw(served[0], raw_request(d=1000))
    with pytest.raises(InferenceServerException, match="regions"):
        send_raw(served[0], raw_request(dtype=np.float64))
    with pytest.raises(InvalidInputError, match="regions"):
        client.rank("cat", [Candidate(id="a", regions=np.zeros((49, 1000), np.float32), keywords=["cat"])])


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features(served, bad):
    arrays = raw_request()
    arrays["regions"][0, 1, 2, 7] = bad
    with pytest.raises(InferenceServerException, match="NaN or infinite"):
        send_raw(served[0], arrays)


@pytest.mark.usefixtures("still_serving")
def test_ragged_keywords_without_mask(client, served):
    with pytest.raises(InvalidInputError, match="different lengths"):
        CandidateArrays(ids=["a", "b"], regions=np.zeros((2, 49, 1280), np.float32), keywords=[["cat"], ["dog", "pet"]])
    # Raw tensors whose candidate counts disagree between regions and keywords.
    arrays = raw_request(n=3, keywords=np.array([[[b"cat"]] * 2], dtype=object))
    with pytest.raises(InferenceServerException, match="candidates"):
        send_raw(served[0], arrays)


@pytest.mark.usefixtures("still_serving")
def test_non_utf8_query(served):
    with pytest.raises(InferenceServerException, match="query is not valid UTF-8") as info:
        send_raw(served[0], raw_request(query=b"\xff\xfecat"))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.usefixtures("still_serving")
def test_unknown_model_version(served, small_corpus):
    server, version = served
    with AMCClient(server.grpc_url, timeout_s=30, model_version=version + 41) as pinned, \
            pytest.raises(ModelVersionError, match=str(version + 41)):
        pinned.rank("cat", corpus_candidates(small_corpus, 2))
    with AMCClient(server.grpc_url, timeout_s=30, model_version=version) as pinned:
        assert pinned.rank("cat", corpus_candidates(small_corpus, 2))[0].model_version == version


def test_golden_requests_of_the_published_version(served, tmp_path):
    """The golden requests saved at publish replay through Triton to the PyTorch outputs."""
    server, version = served
    golden = np.load(server.repository / sig.versioned_ensemble_name(version) / "golden.npz")
    out = infer_arrays(grpcclient.InferenceServerClient(server.grpc_url), sig.versioned_ensemble_name(version), golden)
    for name in ("scores", "modality_weights", "region_attention", "keyword_attention"):
        err = np.linalg.norm(out[name] - golden[name]) / np.linalg.norm(golden[name])
        assert err < TOLERANCE, name
    assert np.all(out["model_version"] == version)


@pytest.mark.usefixtures("still_serving")
def test_client_deadlines_do_not_crash_the_server(served, small_corpus):
    """tritonserver 2.51 can segfault when a gRPC cancellation races a response; the client's deadlines
    must never reach the server as cancellations of in-flight inferences. Without that, this kills it."""
    server, _ = served
    cands = corpus_candidates(small_corpus, 100)
    expired = 0
    for i in range(40):
        with AMCClient(server.grpc_url, timeout_s=0.005 + 0.01 * (i % 10), retries=0) as hasty:
            try:
                hasty.rank("cat face", cands)
            except DeadlineExceededError:
                expired += 1
    assert expired > 0
    assert server.poll() is None, "tritonserver died"


def test_cli_status_against_a_server_with_an_admin_key(served, capsys):
    """The repository index is restricted there; status still reports the serving version as loaded."""
    from amc_client import cli

    server, version = served
    assert cli.main(["status", "--url", server.grpc_url]) == 0
    out = capsys.readouterr().out
    assert f"versions {version} loaded" in out and f"serving  version {version}" in out


# ---- server-side top-k (issue 10 item 2) and whole-store search (item 5) ---------------------------------------


def test_server_side_top_k_returns_the_top_rows_of_the_full_ranking(client, served, small_corpus):
    """With top_k the server answers k rows, best first, each the right candidate with its own explanation."""
    server, _ = served
    query, cands = small_corpus.queries["test"][2].text, corpus_candidates(small_corpus, 30, offset=3)
    full = client.rank(query, cands)
    top = client.rank(query, cands, top_k=5)
    assert [r.candidate_id for r in top] == [r.candidate_id for r in full[:5]]
    for got, want in zip(top, full, strict=False):
        assert got.score == pytest.approx(want.score, rel=1e-6) and got.top_keywords == want.top_keywords
        np.testing.assert_array_equal(got.region_attention, want.region_attention)
    arrays = pack_request([query], [cands])
    out = send_raw(server, {**arrays, "top_k": np.array([[5]], dtype=np.int64)})
    assert out.as_numpy("scores").shape == (1, 5) and out.as_numpy("region_attention").shape == (1, 5, 49)
    ids = [c.id for c in cands]
    assert [ids[i] for i in out.as_numpy("candidate_index")[0]] == [r.candidate_id for r in full[:5]]
    every = send_raw(server, arrays)  # no top_k: every candidate, in request order
    np.testing.assert_array_equal(every.as_numpy("candidate_index")[0], np.arange(30))


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(("top_k", "message"), [
    ([[0]], "top_k is 0; it must be at least 1"),
    ([[-3]], "top_k is -3; it must be at least 1"),
    ([[3]], "top_k is 3, more than the 2 candidates of the request"),
])
def test_bad_top_k_is_an_invalid_argument(served, top_k, message):
    with pytest.raises(InferenceServerException, match=message) as info:
        send_raw(served[0], {**raw_request(n=2), "top_k": np.array(top_k, dtype=np.int64)})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.usefixtures("still_serving")
def test_top_k_above_the_candidates_client_and_server_side(client, small_corpus):
    cands = corpus_candidates(small_corpus, 3)
    with pytest.raises(InvalidInputError, match="top_k 4 is more than the 3 candidates"):
        client.rank("cat", cands, top_k=4)
    with pytest.raises(InvalidInputError, match="INVALID_ARGUMENT.*top_k is 4, more than the 3 candidates"):
        client.rank("cat", cands, top_k=4, validate=False)


def _store_scores(reference, small_corpus, query: str) -> np.ndarray:
    """PyTorch's scores of every stored image (row g = corpus image g) for ``query``."""
    cands = [Candidate(id=f"s{g}", regions=small_corpus.regions[g].astype(np.float32),
                       keywords=small_corpus.keywords[g]) for g in range(len(small_corpus.regions))]
    return pytorch_scores(reference, query, cands)


@pytest.mark.parametrize("query", ["cat face", "red heart"])
def test_search_scores_the_whole_store_as_pytorch_does(client, small_corpus, reference, served, query):
    expected = _store_scores(reference, small_corpus, query)
    results = client.search(query, top_k=10)
    best = np.argsort(-expected, kind="stable")[:10]
    assert [r.store_row for r in results] == best.tolist()
    assert [r.candidate_id for r in results] == [f"s{g}" for g in best]
    got = np.array([r.score for r in results])
    assert np.abs(got - expected[best]).max() / np.abs(expected[best]).max() < TOLERANCE
    first = results[0]
    assert first.model_version == served[1] and [r.rank for r in results] == list(range(1, 11))
    assert {k for k, _ in first.top_keywords} == set(small_corpus.keywords[first.store_row])
    assert first.region_attention.shape == (7, 7) and abs(float(first.region_attention.sum()) - 1) < 1e-4


def test_search_among_a_filter_of_store_rows_equals_ranking_them(client, small_corpus, reference):
    rows = [5, 17, 42, 99, 3, 150]
    query = small_corpus.queries["test"][0].text
    results = client.search(query, top_k=4, ids=rows)
    expected = _store_scores(reference, small_corpus, query)[rows]
    assert [r.store_row for r in results] == [rows[i] for i in np.argsort(-expected, kind="stable")[:4]]
    ranked = client.rank(query, [Candidate(id=f"s{g}", regions=small_corpus.regions[g].astype(np.float32),
                                           keywords=small_corpus.keywords[g]) for g in rows], top_k=4)
    assert [r.candidate_id for r in results] == [r.candidate_id for r in ranked]
    np.testing.assert_allclose([r.score for r in results], [r.score for r in ranked], rtol=1e-4, atol=1e-6)


def test_search_async_and_cli(served, client, capsys):
    import asyncio
    import json

    from amc_client import cli

    server, _ = served

    async def run():
        async with AsyncAMCClient(server.grpc_url, timeout_s=60) as c:
            return await c.search("cat face", top_k=3)

    assert [r.store_row for r in asyncio.run(run())] == [r.store_row for r in client.search("cat face", top_k=3)]
    assert cli.main(["search", "cat face", "--top-k", "3", "--url", server.grpc_url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["store_row"] for r in doc["results"]] == [r.store_row for r in client.search("cat face", top_k=3)]
    assert cli.main(["search", "cat face", "--ids", "4", "4", "--url", server.grpc_url]) == 2
    assert "store row 4 appears more than once" in capsys.readouterr().err


def test_search_many_equals_one_search_per_query(served, client, small_corpus, tmp_path, capsys):
    """Several queries per request (issue 23): each query's answer is what its own search gives, over the whole
    store and among a filter, across the requests of more than SEARCH_MAX_BATCH queries; the CLI reads a file."""
    from amc_client import cli

    server, version = served
    queries = [q.text for q in small_corpus.queries["test"][:5]] + ["cat face", "red heart 🐱"]
    many = queries * (sig.SEARCH_MAX_BATCH // len(queries) + 2)  # two requests
    found = client.search_many(many, top_k=5)
    assert len(found) == len(many)
    for query, results in zip(many, found, strict=True):
        single = client.search(query, top_k=5)
        assert [r.store_row for r in results] == [r.store_row for r in single]
        np.testing.assert_allclose([r.score for r in results], [r.score for r in single], rtol=1e-6)
        assert all(r.model_version == version for r in results)
    rows = [5, 17, 42, 99, 3, 150]
    among = client.search_many(queries[:3], top_k=2, ids=rows)
    assert [[r.store_row for r in rs] for rs in among] == [[r.store_row for r in client.search(q, top_k=2, ids=rows)]
                                                           for q in queries[:3]]
    file = tmp_path / "queries.txt"
    file.write_text("\n".join(queries[:3]) + "\n\n", encoding="utf-8")
    assert cli.main(["search", "--queries-file", str(file), "--top-k", "2", "--url", server.grpc_url, "--json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert [d["query"] for d in docs] == queries[:3]
    assert [[r["store_row"] for r in d["results"]] for d in docs] == [[r.store_row for r in rs[:2]] for rs in found[:3]]


@pytest.mark.usefixtures("still_serving")
def test_search_many_with_a_bad_query_fails_that_call_naming_it(served, client):
    """One bad query fails its call with its index, client-side or (validate=False) from the server; the server
    keeps serving, the same client too."""
    with pytest.raises(InvalidInputError, match=r"queries\[2\]: query is empty"):
        client.search_many(["cat", "dog", "  ", "red heart"], top_k=2)
    with pytest.raises(InvalidInputError, match="INVALID_ARGUMENT.*query 2 of the batch is empty"):
        client.search_many(["cat", "dog", "  ", "red heart"], top_k=2, validate=False)
    with pytest.raises(InvalidInputError, match=r"the request of queries\[64:66\].*query 1 of the batch is empty"):
        client.search_many(["cat"] * 65 + [" "], top_k=2, validate=False)
    assert [len(r) for r in client.search_many(["cat", "dog"], top_k=2)] == [2, 2]


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(("arrays", "message"), [
    ({"top_k": [[0]]}, "top_k is 0; it must be at least 1"),
    ({"top_k": [[161]]}, "top_k is 161, more than the 160 candidates of the request"),
    ({"candidate_ids": [[3, 160]]}, "candidate_ids[0, 1] = 160 is outside the candidate store of version 1 (0 .. 159)"),
    ({"candidate_ids": [[-1]]}, "candidate_ids[0, 0] = -1 is outside the candidate store"),
    ({"candidate_ids": [[7, 2, 7]]}, "candidate_ids[0] repeats store row 7 (at positions 0 and 2)"),
    ({"candidate_ids": [[7, 2]], "top_k": [[3]]}, "top_k is 3, more than the 2 candidates of the request"),
    ({"candidate_ids": np.empty((1, 0))}, "candidate set is empty"),
])
def test_search_bad_inputs_are_invalid_arguments_and_search_still_works(served, small_corpus, arrays, message):
    assert len(small_corpus.regions) == 160
    request = {"query": np.array([[b"cat"]], dtype=object),
               **{k: np.asarray(v, dtype=np.int64) for k, v in arrays.items()}}
    with pytest.raises(InferenceServerException) as info:
        grpcclient.InferenceServerClient(served[0].grpc_url).infer(sig.SEARCH_ENSEMBLE_NAME, raw_inputs(request),
                                                                   client_timeout=60)
    assert message in info.value.message() and info.value.status() == "StatusCode.INVALID_ARGUMENT"
    with AMCClient(served[0].grpc_url, timeout_s=60) as c:
        assert len(c.search("cat", top_k=2)) == 2


def test_a_query_of_words_the_store_lacks_is_searched(served):
    """The search step numbers the words the store lacks one each (the search graph's lexical match must not see a
    number twice), so a query of several is still served."""
    with AMCClient(served[0].grpc_url, timeout_s=60) as amc:
        assert len(amc.search("blorptastic frumious cat snarkle", top_k=2)) == 2


def test_supervisor_probes_the_search_ensembles_too(served):
    """The supervisor's golden rounds cover whole-store search: its ensembles are probed, and the probe passes."""
    server, version = served
    supervisor = Supervisor(server)
    probed = supervisor.ensembles()
    assert {sig.SEARCH_ENSEMBLE_NAME, sig.versioned_search_ensemble_name(version), sig.ENSEMBLE_NAME} <= set(probed)
    assert not is_search_ensemble(sig.ENSEMBLE_NAME) and not is_search_ensemble(f"{sig.SEARCH_ENSEMBLE_NAME}_vx")
    for name in probed:
        probe = supervisor._probe(name)
        assert probe.ok, f"{name}: HTTP {probe.status} {probe.message}"
    assert supervisor.check() and supervisor.ready
