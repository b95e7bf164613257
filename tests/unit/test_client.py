"""Fast unit tests of the AMC client (no server): packing, validation, unpacking, routing, retries, errors, CLI."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import amc_client
from amc_client import (
    AMCClient,
    AsyncAMCClient,
    Candidate,
    CandidateArrays,
    DeadlineExceededError,
    InvalidInputError,
    MixedVersionError,
    ModelVersionError,
    RankedResult,
    ServerUnavailableError,
    _packing,
    _routing,
    cli,
    pack_request,
)
from amc_contract import signatures as sig

D = sig.REGION_FEATURE_DIM


def cand(cid: str, level: float = 0.0, keywords=("cat", "face"), r: int = 49, **kw) -> Candidate:
    """A candidate whose fake score is ``level`` (the fake server scores by the mean of the real regions)."""
    return Candidate(cid, np.full((r, D), level, dtype=np.float32), list(keywords), **kw)


# ---- a fake tritonclient -------------------------------------------------------------------------------------


class _Result:
    def __init__(self, outputs):
        self.outputs = outputs

    def as_numpy(self, name):
        return self.outputs.get(name)


class FakeTriton:
    """Stands in for tritonclient.grpc.InferenceServerClient; scores by region mean, records every call.

    ``errors``: exceptions raised by the next infer calls, in order. ``loaded``: the amc_v{N} versions.
    """

    def __init__(self, version=1, routing=None, errors=(), loaded=(1,), version_out=None):
        self.version = version
        self.routing = routing or {"serving_version": "1", "canary_version": "", "canary_share": "0"}
        self.errors = list(errors)
        self.loaded = list(loaded)
        self.version_out = version_out
        self.calls: list[tuple[str, dict]] = []

    def get_model_config(self, model_name, **kw):
        self.calls.append(("get_model_config", {"model_name": model_name, **kw}))
        return {
            "config": {
                "name": model_name,
                "parameters": {k: {"string_value": v} for k, v in self.routing.items()},
            }
        }

    def get_model_repository_index(self, **kw):
        self.calls.append(("get_model_repository_index", kw))
        return {
            "models": [{"name": "amc", "version": "1", "state": "READY"}]
            + [{"name": f"amc_v{v}", "version": "1", "state": "READY"} for v in self.loaded]
            + [{"name": "amc_v99", "state": "UNAVAILABLE"}]
        }

    def is_server_ready(self, **kw):
        return True

    def is_model_ready(self, name, **kw):
        return True

    def close(self):
        self.calls.append(("close", {}))

    def infer(self, model_name, inputs, outputs=None, **kw):
        arrays = {i.name(): _decode(i) for i in inputs}
        self.calls.append(("infer", {"model_name": model_name, "arrays": arrays, **kw}))
        if self.errors:
            raise self.errors.pop(0)
        regions, mask, keywords = arrays["regions"], arrays["region_mask"], arrays["keywords"]
        b, n, _ = mask.shape
        real = mask.sum(-1).clip(min=1)
        scores = (regions.mean(-1) * mask).sum(-1) / real  # (B, N)
        att = mask / real[..., None]
        lengths = np.vectorize(len)(keywords).astype(np.float32)  # longer keywords get more attention
        katt = lengths / lengths.sum(-1, keepdims=True).clip(min=1)
        weights = np.broadcast_to(np.array([0.7, 0.3], np.float32), (b, n, 2))
        version = self.version if self.version_out is None else self.version_out
        if model_name.startswith("amc_v"):
            version = int(model_name[5:]) if self.version_out is None else self.version_out
        return _Result(
            {
                "scores": scores.astype(np.float32),
                "modality_weights": weights.copy(),
                "region_attention": att.astype(np.float32),
                "keyword_attention": katt,
                "model_version": np.full((b, 1), version, np.int64),
            }
        )


def _decode(infer_input):
    """Rebuild the numpy array an InferInput carries (what the server would see)."""
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    raw, shape, dtype = infer_input._get_content(), infer_input.shape(), infer_input.datatype()
    if dtype == "BYTES":
        return deserialize_bytes_tensor(raw).reshape(shape)
    return np.frombuffer(raw, dtype=triton_to_np_dtype(dtype)).reshape(shape)


def err(code: str, msg: str = "boom") -> InferenceServerException:
    return InferenceServerException(msg, status=f"StatusCode.{code}")


def client(fake=None, **kw) -> AMCClient:
    kw.setdefault("backoff_s", 0.0)
    return AMCClient("fake:8001", _inner=fake or FakeTriton(), **kw)


# ---- packing -------------------------------------------------------------------------------------------------


def test_pack_pads_candidates_regions_and_keywords_across_queries():
    a = [cand("a1", keywords=["cat"]), cand("a2", keywords=["dog", "pet", "animal"], r=10)]
    b = [cand("b1", keywords=[])]
    arrays = pack_request(["a cat", "a dog"], [a, b])
    assert arrays["query"].shape == (2, 1) and arrays["query"][1, 0] == b"a dog"
    assert arrays["regions"].shape == (2, 2, 49, D) and arrays["regions"].dtype == np.float32
    assert arrays["region_mask"].dtype == bool
    assert arrays["region_mask"].sum(-1).tolist() == [
        [49, 10],
        [49, 0],
    ]  # a2 has 10 regions, b's 2nd is padding
    assert arrays["keywords"].shape == (2, 2, 3)
    assert arrays["keywords"][0, 0].tolist() == [b"cat", b"", b""]
    assert arrays["keywords"][0, 1].tolist() == [b"dog", b"pet", b"animal"]
    assert arrays["keywords"][1].tolist() == [[b"", b"", b""], [b"", b"", b""]]
    assert set(arrays) == {s.name for s in sig.ENSEMBLE.inputs if not s.optional}  # no top_k asked: none sent


def test_pack_candidate_arrays_single_query_is_not_copied_and_mask_is_kept():
    regions = np.ones((3, 49, D), np.float32)
    mask = np.ones((3, 49), bool)
    mask[1, 20:] = False
    ca = CandidateArrays(["x", "y", "z"], regions, np.array([["a", ""], ["b", "c"], ["d", ""]]), mask)
    arrays = pack_request(["q"], [ca])
    assert np.shares_memory(arrays["regions"], regions)
    assert arrays["region_mask"][0, 1].sum() == 20
    assert arrays["keywords"][0, :, 1].tolist() == [b"", b"c", b""]


def test_groups_split_at_max_batch_and_request_size():
    small = _packing.normalize([cand("a")])
    assert [len(g) for g in _packing.groups([small] * 19)] == [8, 8, 3]
    big = _packing.normalize(
        CandidateArrays(
            [f"c{i}" for i in range(1000)], np.zeros((1000, 49, D), np.float32), np.full((1000, 1), "k")
        )
    )
    assert [len(g) for g in _packing.groups([big] * 5)] == [4, 1]  # 4 x 250 MB <= 1 GiB


# ---- validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "regions, keywords, mask, message",
    [
        (np.zeros((49,), np.float32), ["a"], None, "shape (R, 1280)"),
        (np.zeros((49, 512), np.float32), ["a"], None, "got (49, 512)"),
        (np.zeros((49, D), np.int64), ["a"], None, "must be float32 (float64 is cast), got int64"),
        (np.zeros((0, D), np.float32), ["a"], None, "no regions"),
        ([[0.0] * D], ["a"], None, "numpy array"),
        (np.full((49, D), np.nan, np.float32), ["a"], None, "NaN or inf"),
        (np.zeros((49, D), np.float32), "cat", None, "not a single string"),
        (np.zeros((49, D), np.float32), ["cat", 3], None, "keyword 1 is int 3, not a string"),
        (np.zeros((49, D), np.float32), ["cat", ""], None, "keyword 1 is empty"),
        (np.zeros((49, D), np.float32), ["a"], np.ones(48, bool), "region_mask must have shape (R,)"),
        (np.zeros((49, D), np.float32), ["a"], np.ones(49, np.int8), "region_mask must be a bool"),
        (np.zeros((49, D), np.float32), ["a"], np.zeros(49, bool), "masks every region"),
    ],
)
def test_candidate_validation_names_candidate_and_problem(regions, keywords, mask, message):
    with pytest.raises(InvalidInputError, match="candidate 'img-7'") as info:
        Candidate("img-7", regions, keywords, mask)
    assert message in str(info.value)


def test_candidate_casts_float64_and_rejects_overflow():
    c = Candidate("a", np.zeros((49, D), np.float64), ("x",))
    assert c.regions.dtype == np.float32 and c.keywords == ("x",)
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        Candidate("a", np.full((49, D), 1e300), ())


def test_candidate_arrays_ragged_keywords_say_how_to_fix():
    with pytest.raises(
        InvalidInputError,
        match=r"keyword lists have different lengths \(1, 3\); pad each list "
        r"with '' to 3 keywords, or pass a list of Candidate",
    ):
        CandidateArrays(["a", "b"], np.zeros((2, 49, D), np.float32), [["x"], ["y", "z", "w"]])
    with pytest.raises(InvalidInputError, match="2 ids but regions has 3"):
        CandidateArrays(["a", "b"], np.zeros((3, 49, D), np.float32), [["x"]] * 3)


@pytest.mark.parametrize(
    "query, cands, message",
    [
        ("", [cand("a")], "query is empty"),
        ("   ", [cand("a")], "query is empty"),
        ("cat", [], "candidate set is empty"),
        ("cat", [cand("a"), cand("a")], "'a' appears more than once"),
    ],
)
def test_request_validation_happens_before_any_network_call(query, cands, message):
    fake = FakeTriton()
    with pytest.raises(InvalidInputError, match=message):
        client(fake).rank(query, cands)
    assert fake.calls == []


def test_too_many_candidates_rejected_client_side_unless_validate_false():
    n = sig.MAX_CANDIDATES + 1
    many = CandidateArrays([f"c{i}" for i in range(n)], np.zeros((n, 1, D), np.float32), np.full((n, 1), "k"))
    fake = FakeTriton(errors=[err("INVALID_ARGUMENT", "1001 candidates, more than 1000")])
    with pytest.raises(InvalidInputError, match="more than the server's limit of 1000"):
        client(fake).rank("cat", many)
    assert fake.calls == []
    with pytest.raises(InvalidInputError, match=r"server rejected .*INVALID_ARGUMENT.*1001 candidates"):
        client(fake).rank("cat", many, validate=False)
    assert [c[0] for c in fake.calls] == ["get_model_config", "infer"]


def test_validate_false_sends_empty_query_and_empty_set_to_the_server():
    fake = FakeTriton(errors=[err("INVALID_ARGUMENT", "empty query")] * 2)
    with pytest.raises(InvalidInputError, match="empty query"):
        client(fake).rank("", [cand("a")], validate=False)
    with pytest.raises(InvalidInputError):
        client(fake).rank("cat", [], validate=False)
    sent = [c[1]["arrays"] for c in fake.calls if c[0] == "infer"]
    assert sent[0]["query"][0, 0] == b"" and sent[1]["region_mask"].shape[1] == 1
    assert not sent[1]["region_mask"].any()


# ---- results -------------------------------------------------------------------------------------------------


def test_results_ranked_by_score_padding_dropped_and_explained():
    fake = FakeTriton(version=4)
    with client(fake) as c:
        a = [cand("low", 0.1), cand("high", 0.9, keywords=["hat", "grinning", "cat"]), cand("mid", 0.5, r=10)]
        b = [cand("only", 0.3)]
        ra, rb = c.rank_many(["cat with a hat", "dog"], [a, b])
    assert [r.candidate_id for r in ra] == ["high", "mid", "low"]
    assert [r.rank for r in ra] == [1, 2, 3]
    assert [r.candidate_id for r in rb] == ["only"]  # b's two padded candidates are dropped
    high = ra[0]
    assert isinstance(high, RankedResult) and high.model_version == 4
    assert high.score == pytest.approx(0.9) and (high.visual_weight, high.language_weight) == pytest.approx(
        (0.7, 0.3)
    )
    assert [k for k, _ in high.top_keywords] == ["grinning", "hat", "cat"]  # highest attention first
    assert high.top_keywords[0][1] == pytest.approx(8 / 14)
    assert high.region_attention.shape == (7, 7)
    assert ra[1].region_attention.shape == (10,)  # not 49 regions: no map, padding cut off
    assert rb[0].top_keywords == [("face", pytest.approx(4 / 7)), ("cat", pytest.approx(3 / 7))]
    assert len([c for c in fake.calls if c[0] == "infer"]) == 1  # both queries in one request


def test_top_k_and_rank_many_keeps_query_order_across_requests():
    c = client()
    sets = [[cand(f"q{i}-a", 0.2), cand(f"q{i}-b", 0.4)] for i in range(11)]
    out = c.rank_many([f"query {i}" for i in range(11)], sets, top_k=1)
    assert [r[0].candidate_id for r in out] == [f"q{i}-b" for i in range(11)]
    assert len([x for x in c._inner.calls if x[0] == "infer"]) == 2  # 8 + 3
    with pytest.raises(InvalidInputError, match="top_k"):
        c.rank("cat", [cand("a")], top_k=0)


def test_mixed_version_response_is_an_error():
    with pytest.raises(MixedVersionError, match="mixed-version"):
        client(FakeTriton(version=-1)).rank("cat", [cand("a")])
    with pytest.raises(MixedVersionError, match="version 2, but version 3 answered"):
        client(FakeTriton(version_out=3), model_version=2).rank("cat", [cand("a")])


# ---- routing -------------------------------------------------------------------------------------------------


def test_routing_parse():
    r = _routing.parse(
        {
            "config": {
                "parameters": {
                    "serving_version": {"string_value": "2"},
                    "canary_version": {"string_value": "3"},
                    "canary_share": {"string_value": "0.25"},
                }
            }
        }
    )
    assert (r.serving_version, r.canary_version, r.canary_share) == (2, 3, 0.25)
    assert _routing.parse({"config": {}}) == amc_client.Routing(None, None, 0.0)
    with pytest.raises(amc_client.AMCError, match="canary_share"):
        _routing.parse(
            {
                "config": {
                    "parameters": {
                        "canary_version": {"string_value": "3"},
                        "canary_share": {"string_value": "1.5"},
                    }
                }
            }
        )


def test_search_follows_the_canary_only_where_it_has_a_store():
    params = {"serving_version": "1", "canary_version": "2", "canary_share": "0.5"}
    without = _routing.parse(FakeTriton(routing=params).get_model_config("amc"))
    with_store = _routing.parse(FakeTriton(routing={**params, "canary_search": "1"}).get_model_config("amc"))
    assert not without.canary_search and with_store.canary_search
    rng = random.Random(0)
    assert {_routing.pick_search(without, rng) for _ in range(200)} == {("amc_search", None)}
    picks = [_routing.pick_search(with_store, rng) for _ in range(2000)]
    assert set(picks) == {("amc_search", None), ("amc_search_v2", 2)}
    assert abs(picks.count(("amc_search_v2", 2)) / len(picks) - 0.5) < 0.05
    # No canary version: the flag means nothing.
    assert not _routing.parse(FakeTriton(routing={"serving_version": "1", "canary_search": "1"})
                              .get_model_config("amc")).canary_search


@pytest.mark.parametrize("share", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_canary_share_of_picks(share):
    routing = _routing.parse(
        FakeTriton(
            routing={"serving_version": "1", "canary_version": "2", "canary_share": str(share)}
        ).get_model_config("amc")
    )
    rng = random.Random(1234)
    picks = [_routing.pick(routing, rng) for _ in range(10_000)]
    canary = sum(p == ("amc_v2", 2) for p in picks) / len(picks)
    assert abs(canary - share) <= 0.01
    assert {p for p in picks} <= {("amc_v2", 2), ("amc", None)}


def test_client_routes_caches_routing_and_pins_versions():
    fake = FakeTriton(
        routing={"serving_version": "1", "canary_version": "2", "canary_share": "0.5"}, loaded=(1, 2)
    )
    c = client(fake, routing_refresh_s=60)
    c._rng = random.Random(0)
    versions = [c.rank("cat", [cand("a")])[0].model_version for _ in range(200)]
    assert 70 < versions.count(2) < 130 and set(versions) == {1, 2}
    assert sum(name == "get_model_config" for name, _ in fake.calls) == 1  # cached
    pinned = client(fake, model_version=1)
    assert all(pinned.rank("cat", [cand("a")])[0].model_version == 1 for _ in range(20))
    assert fake.calls[-1][1]["model_name"] == "amc_v1"
    assert c.routing().canary_share == 0.5


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_routing_is_refreshed_ahead_apart_and_read_first_once_too_old():
    """routing_refresh_s = 2: the first request reads the routing; past half that age a request goes by the
    routing in hand while one refresh runs apart (a slow read blocks nobody, and the requests meanwhile start no
    second read); the refreshed routing serves the requests after it; a failed refresh keeps the routing in hand
    and is not tried again at once; past the full age a request reads it first (a rollback reaches every request
    within routing_refresh_s); a closing client starts no refresh."""
    import threading

    fake = FakeTriton(routing={"serving_version": "1", "canary_version": "2", "canary_share": "0"}, loaded=(1, 2))
    original, release, reads = fake.get_model_config, threading.Event(), []
    c = client(fake, routing_refresh_s=2.0)
    assert c.rank("cat", [cand("a")])[0].model_version == 1  # read first: nothing in hand yet
    assert [name for name, _ in fake.calls] == ["get_model_config", "infer"]

    def slow_config(model_name, **kw):
        reads.append(time.monotonic())
        assert release.wait(10)
        return original(model_name, **kw)

    fake.get_model_config = slow_config
    fake.routing = {"serving_version": "1", "canary_version": "2", "canary_share": "1"}
    time.sleep(1.1)
    started = time.monotonic()
    assert [c.rank("cat", [cand("a")])[0].model_version for _ in range(3)] == [1, 1, 1]  # the routing in hand
    assert time.monotonic() - started < 0.5
    _wait_until(lambda: reads)
    assert c.rank("cat", [cand("a")])[0].model_version == 1 and len(reads) == 1  # one read at a time
    release.set()
    _wait_until(lambda: c._routing.canary_share == 1 and not c._refreshing)
    assert c.rank("cat", [cand("a")])[0].model_version == 2  # the refreshed routing: all to the canary
    failed = []

    def failing_config(model_name, **kw):
        failed.append(time.monotonic())
        raise err("UNAVAILABLE")

    fake.get_model_config = failing_config
    time.sleep(1.1)
    assert c.rank("cat", [cand("a")])[0].model_version == 2  # the refresh fails apart; the request does not
    _wait_until(lambda: failed and not c._refreshing)
    attempts = len(failed)
    assert c.rank("cat", [cand("a")])[0].model_version == 2  # right after the failure: no new try
    time.sleep(0.1)
    assert len(failed) == attempts
    fake.get_model_config, fake.routing = original, {"serving_version": "1", "canary_version": "", "canary_share": "0"}
    time.sleep(1.0)  # past the full age: read before the request
    assert c.rank("cat", [cand("a")])[0].model_version == 1
    fake.get_model_config = failing_config
    c.close()
    time.sleep(1.1)
    c.rank("cat", [cand("a")])  # the fake still answers: a closed client starts no refresh
    time.sleep(0.1)
    assert len(failed) == attempts


def test_async_client_refreshes_routing_ahead_apart():
    fake = FakeTriton(routing={"serving_version": "1", "canary_version": "2", "canary_share": "0"}, loaded=(1, 2))

    async def main():
        release = asyncio.Event()

        class AsyncFake:
            def __getattr__(self, name):
                async def call(*a, **kw):
                    if name == "get_model_config" and fake.calls:
                        await release.wait()  # a slow read, after the first
                    return getattr(fake, name)(*a, **kw)

                return call

        async with AsyncAMCClient("fake:8001", _inner=AsyncFake(), routing_refresh_s=2.0, backoff_s=0.0) as c:
            first = (await c.rank("cat", [cand("a")]))[0].model_version
            fake.routing = {"serving_version": "1", "canary_version": "2", "canary_share": "1"}
            await asyncio.sleep(1.1)
            stale = [(await c.rank("cat", [cand("a")]))[0].model_version for _ in range(3)]  # not blocked
            release.set()
            await asyncio.wait(set(c._pending_tasks))
            fresh = (await c.rank("cat", [cand("a")]))[0].model_version
            refreshing = c._refreshing
        return first, stale, fresh, refreshing

    assert asyncio.run(asyncio.wait_for(main(), 20)) == (1, [1, 1, 1], 2, False)


def test_unknown_version_lists_loaded_versions_without_retrying():
    fake = FakeTriton(
        loaded=(1, 2), errors=[err("INVALID_ARGUMENT", "Request for unknown model: 'amc_v7' is not found")]
    )
    with pytest.raises(
        ModelVersionError, match="model version 7 is not loaded .*; loaded versions: 1, 2"
    ) as info:
        client(fake, model_version=7).rank("cat", [cand("a")])
    assert info.value.version == 7 and info.value.loaded == [1, 2]
    assert isinstance(info.value.__cause__, InferenceServerException)
    assert sum(name == "infer" for name, _ in fake.calls) == 1
    assert client(fake).model_versions() == [1, 2]


def test_canary_gone_rereads_routing_once():
    fake = FakeTriton(
        routing={"serving_version": "1", "canary_version": "2", "canary_share": "1"},
        errors=[err("UNAVAILABLE", "Request for unknown model: 'amc_v2' has no available versions")],
    )
    c = client(fake, routing_refresh_s=60)
    fake_routing_after = {"serving_version": "2", "canary_version": "", "canary_share": "0"}
    original = fake.get_model_config

    def config(model_name, **kw):
        out = original(model_name, **kw)
        fake.routing = fake_routing_after
        return out

    fake.get_model_config = config
    assert c.rank("cat", [cand("a")])[0].candidate_id == "a"
    assert [x[1]["model_name"] for x in fake.calls if x[0] == "infer"] == ["amc_v2", "amc"]


# ---- retries and errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN"])
def test_retryable_failures_are_retried(code):
    fake = FakeTriton(errors=[err(code), err(code)])
    assert client(fake, retries=3).rank("cat", [cand("a")])[0].candidate_id == "a"
    assert sum(name == "infer" for name, _ in fake.calls) == 3


def test_retries_give_up_with_server_unavailable():
    fake = FakeTriton(errors=[err("UNAVAILABLE", "connection refused")] * 5)
    with pytest.raises(
        ServerUnavailableError,
        match=r"server at fake:8001 is not reachable \(UNAVAILABLE\): "
        "connection refused",
    ) as info:
        client(fake, retries=2).rank("cat", [cand("a")])
    assert isinstance(info.value.__cause__, InferenceServerException)
    assert sum(name == "infer" for name, _ in fake.calls) == 3


@pytest.mark.parametrize(
    "code, exc",
    [
        ("INVALID_ARGUMENT", InvalidInputError),
        ("OUT_OF_RANGE", InvalidInputError),
        ("DEADLINE_EXCEEDED", DeadlineExceededError),
        ("PERMISSION_DENIED", amc_client.AMCError),
    ],
)
def test_other_failures_are_not_retried(code, exc):
    fake = FakeTriton(errors=[err(code, "tokenizer: bad keywords")])
    with pytest.raises(exc) as info:
        client(fake).rank("cat", [cand("a")])
    assert sum(name == "infer" for name, _ in fake.calls) == 1
    if exc is InvalidInputError:
        assert "tokenizer: bad keywords" in str(info.value)


@pytest.mark.parametrize(
    "code, text, says",
    [
        ("INTERNAL", "in ensemble 'amc', Stub process 'amc_tokenizer_0_0' is not healthy.", "failed to serve"),
        ("UNKNOWN", "Socket closed", "failed to serve"),
        ("UNAVAILABLE", "in ensemble 'amc', Exceeds maximum queue size", "is overloaded"),
        ("UNAVAILABLE", "in ensemble 'amc', Request timeout expired", "is overloaded"),
        ("UNAVAILABLE", "failed to connect to all addresses", "is not reachable"),
    ],
)
def test_server_faults_are_server_unavailable_never_invalid_input(code, text, says):
    """A dead Python-backend step answers INTERNAL: the server's fault, retryable, never the caller's."""
    fake = FakeTriton(errors=[err(code, text)] * 3)
    with pytest.raises(ServerUnavailableError, match=says) as info:
        client(fake, retries=2, backoff_s=0.001).rank("cat", [cand("a")])
    assert not isinstance(info.value, InvalidInputError)
    assert info.value.retryable and info.value.status == code
    assert sum(name == "infer" for name, _ in fake.calls) == 3


SCHEDULING_SLACK_S = 0.3  # how late a busy 2-core machine may wake a thread past a deadline (CI runs other work too)


def test_backoff_is_exponential_with_jitter_and_bounded_by_deadline():
    from amc_client import _calls

    rng = random.Random(0)
    delays = [_calls.backoff(0.1, a, rng) for a in range(4)]
    for a, d in enumerate(delays):
        assert 0.05 * 2**a <= d < 0.15 * 2**a
    fake = FakeTriton(errors=[err("UNAVAILABLE")] * 10)
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError):
        client(fake, retries=10, backoff_s=0.2, timeout_s=0.5).rank("cat", [cand("a")])
    # Unbounded, 10 retries from 0.2 s would back off for seconds; the slack is a loaded machine's late wake-up.
    assert time.monotonic() - start < 0.5 + SCHEDULING_SLACK_S


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_raises_unavailable_within_deadline():
    url = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with (
        AMCClient(url, timeout_s=2.0) as c,
        pytest.raises(ServerUnavailableError, match=rf"server at {url} is not reachable \(UNAVAILABLE\)"),
    ):
        c.rank("cat", [cand("a")])
    assert time.monotonic() - start < 2.0 + SCHEDULING_SLACK_S
    assert AMCClient(url, timeout_s=1.0).server_ready() is False


def test_silent_server_raises_deadline_exceeded_on_time():
    with socket.socket() as listener:  # accepts connections, never speaks gRPC
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with AMCClient(url, timeout_s=0.5) as c, pytest.raises(DeadlineExceededError, match="within 0.5 s"):
            c.rank("cat", [cand("a")])
        assert time.monotonic() - start < 1.0


def test_async_client_against_a_closed_port_and_a_fake():
    url = f"127.0.0.1:{_closed_port()}"

    async def main():
        async with AsyncAMCClient(url, timeout_s=2.0) as c:
            start = time.monotonic()
            with pytest.raises(ServerUnavailableError, match="not reachable"):
                await c.rank("cat", [cand("a")])
            assert time.monotonic() - start < 2.0
        fake = FakeTriton(errors=[err("UNAVAILABLE")])
        sync_fake = fake

        class AsyncFake:
            def __getattr__(self, name):
                async def call(*a, **kw):
                    return getattr(sync_fake, name)(*a, **kw)

                return call

        async with AsyncAMCClient(url, _inner=AsyncFake(), backoff_s=0.0) as c:
            results = await c.rank("cat", [cand("a", 0.1), cand("b", 0.2)])
            assert await c.model_versions() == [1]
        return results

    assert [r.candidate_id for r in asyncio.run(main())] == ["b", "a"]


# ---- CLI -----------------------------------------------------------------------------------------------------


def _results() -> list[RankedResult]:
    att = np.zeros((7, 7), np.float32)
    return [
        RankedResult(
            "grinning-cat",
            0.8123,
            1,
            0.65,
            0.35,
            [("cat", 0.52), ("face", 0.31), ("pet", 0.1), ("x", 0.07)],
            att,
            3,
        ),
        RankedResult("dog", -0.25, 2, 0.4, 0.6, [], att, 3),
    ]


def test_cli_table_format():
    lines = cli.format_table(_results()).splitlines()
    assert lines[0].split() == ["rank", "id", "score", "visual", "language", "top", "keywords"]
    assert lines[1] == "   1  grinning-cat   0.8123    0.65      0.35  cat (0.52), face (0.31), pet (0.10)"
    assert lines[2] == "   2  dog           -0.2500    0.40      0.60  -"


def _npz(tmp_path, **override):
    arrays = dict(
        ids=np.array(["a", "b", "c"]),
        regions=np.stack([np.full((49, D), v, np.float32) for v in (0.1, 0.5, 0.3)]),
        keywords=np.array([["cat", ""], ["dog", "pet"], ["hat", ""]]),
    )
    arrays.update(override)
    path = tmp_path / "cands.npz"
    np.savez(path, **arrays)
    return str(path)


def test_cli_rank_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        cli, "AMCClient", lambda url, **kw: AMCClient(url, _inner=FakeTriton(version=2), **kw)
    )
    assert cli.main(["rank", "a cat", "--candidates", _npz(tmp_path), "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "query 'a cat': 3 candidates, model version 2"
    assert [line.split()[1] for line in out[2:]] == ["b", "c"]
    assert cli.main(["rank", "a cat", "--candidates", _npz(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_version"] == 2 and [r["id"] for r in doc["results"]] == ["b", "c", "a"]
    assert doc["results"][0]["top_keywords"][0] == ["dog", pytest.approx(0.5)]


def test_cli_exit_codes_and_one_line_errors(tmp_path, capsys):
    url = f"127.0.0.1:{_closed_port()}"
    assert cli.main(["rank", "cat", "--candidates", _npz(tmp_path), "--url", url, "--timeout", "2"]) == 3
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "not reachable" in err_lines[0]
    assert cli.main(["status", "--url", url, "--timeout", "1"]) == 3
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert cli.main(["rank", "cat", "--candidates", str(tmp_path / "missing.npz")]) == 2
    assert "cannot read candidates file" in capsys.readouterr().err
    assert cli.main(["rank", "", "--candidates", _npz(tmp_path), "--url", url]) == 2
    assert "query is empty" in capsys.readouterr().err
    bad = _npz(tmp_path, regions=np.zeros((3, 49, 7), np.float32))
    assert cli.main(["rank", "cat", "--candidates", bad]) == 2
    assert "1280 features, got (3, 49, 7)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["rank"])
    assert info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_status(monkeypatch, capsys):
    fake = FakeTriton(
        routing={"serving_version": "1", "canary_version": "2", "canary_share": "0.1"}, loaded=(1, 2)
    )
    monkeypatch.setattr(cli, "AMCClient", lambda url, **kw: AMCClient(url, _inner=fake, **kw))
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "versions 1, 2 loaded" in out and "version 2 gets 10% of queries" in out


def test_save_and_load_candidates_roundtrip(tmp_path):
    path = tmp_path / "c.npz"
    cli.save_candidates(path, [cand("a", keywords=["x"]), cand("b", keywords=["y", "z"])])
    loaded = cli.load_candidates(path)
    assert loaded.ids == ("a", "b") and loaded.keywords.tolist() == [["x", ""], ["y", "z"]]


# ---- images --------------------------------------------------------------------------------------------------


def test_images_module_imports_torch_lazily():
    import subprocess
    import sys

    code = "import amc_client, amc_client.images, sys; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


@pytest.mark.slow
def test_extract_region_features_matches_training(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    corpus = pytest.importorskip("training.corpus")
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (136, 128, 3), dtype=np.uint8)) for _ in range(2)]
    ours = amc_client.extract_region_features(images)
    theirs = corpus.extract_region_features(images, progress=False).astype(np.float32)
    assert ours.shape == (2, 49, D) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-2, atol=1e-2)
    images[0].save(tmp_path / "one.png")
    cands = amc_client.candidates_from_images([tmp_path / "one.png"], keywords=[["cat"]])
    assert cands[0].id == "one" and cands[0].keywords == ("cat",)
    np.testing.assert_allclose(cands[0].regions, ours[0], rtol=1e-4, atol=1e-4)
