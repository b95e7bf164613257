"""The client's fleet of replicas (amc_client._fleet): the balancer on fake replicas (on 2 real tritonservers:
tests/integration/test_fleet.py)."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time

import pytest

from amc_client import (
    AMCClient,
    AsyncAMCClient,
    DeadlineExceededError,
    InvalidInputError,
    ServerUnavailableError,
    _fleet,
)
from tests.unit.test_client import FakeTriton, cand, err

REFUSED = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"


class Replica(FakeTriton):
    """A fake replica: ``ready`` answers the readiness probe; ``hang_s`` makes each inference take that long
    (answering DEADLINE_EXCEEDED if the caller's attempt deadline is shorter)."""

    def __init__(self, *, ready=True, hang_s=0.0, **kw):
        super().__init__(**kw)
        self.ready, self.hang_s, self.attempts = ready, hang_s, 0

    def is_model_ready(self, name, *a, **kw):
        self.calls.append(("is_model_ready", {"model_name": name}))
        if isinstance(self.ready, Exception):
            raise self.ready
        return self.ready

    def infer(self, model_name, inputs, outputs=None, client_timeout=None, **kw):
        self.attempts += 1
        if self.hang_s:
            time.sleep(min(self.hang_s, client_timeout or self.hang_s))
            if client_timeout is not None and client_timeout < self.hang_s:
                raise err("DEADLINE_EXCEEDED", "Deadline Exceeded")
        return super().infer(model_name, inputs, outputs, client_timeout=client_timeout, **kw)

    def infers(self) -> int:
        return self.attempts


def fleet_client(replicas: dict[str, Replica], **kw) -> AMCClient:
    kw.setdefault("backoff_s", 0.0)
    return AMCClient(list(replicas), _inner=replicas, **kw)


def status(client, url):
    return next(s for s in client.replicas() if s.url == url)


# ---- URLs ------------------------------------------------------------------------------------------------------


def test_one_url_is_kept_as_given_and_a_list_or_comma_list_makes_a_fleet(caplog):
    assert _fleet.replica_urls("127.0.0.1:8001") == ["127.0.0.1:8001"]
    assert _fleet.replica_urls("a:1, b:2") == ["a:1", "b:2"]
    with caplog.at_level(logging.WARNING, logger="amc_client"):
        assert _fleet.replica_urls(["a:1", "b:2", "a:1"]) == ["a:1", "b:2"]
    assert "replica a:1 is listed more than once" in caplog.text
    c = AMCClient("fake:8001", _inner=FakeTriton())
    assert c.url == "fake:8001" and c.urls == ["fake:8001"]
    for bad, says in [([], "a list of them"), ("a:1,,b:2", "empty entry"), (["a:1", 7], "a list of them"),
                      ("dns:///nohost", "dns:///host:port")]:
        with pytest.raises(InvalidInputError, match=says):
            _fleet.replica_urls(bad)


def test_dns_name_resolves_to_every_address():
    def resolve(host, port, type):
        assert (host, port) == ("amc.ns.svc", 8001)
        return [(socket.AF_INET, type, 6, "", ("10.0.0.1", port)), (socket.AF_INET, type, 6, "", ("10.0.0.2", port)),
                (socket.AF_INET, type, 6, "", ("10.0.0.1", port)), (socket.AF_INET6, type, 6, "", ("fd00::3", port, 0, 0))]

    assert _fleet.replica_urls("dns:///amc.ns.svc:8001", resolve=resolve) == [
        "10.0.0.1:8001", "10.0.0.2:8001", "[fd00::3]:8001"]

    def fails(host, port, type):
        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(InvalidInputError, match="cannot resolve 'nowhere.invalid'"):
        _fleet.replica_urls("dns:///nowhere.invalid:8001", resolve=fails)
    # localhost through the real resolver: at least one address, each once
    urls = _fleet.replica_urls("dns:///localhost:8001")
    assert urls and len(urls) == len(set(urls)) and all(u.endswith(":8001") for u in urls)


# ---- the balancer ----------------------------------------------------------------------------------------------


def test_least_outstanding_requests():
    fleet = _fleet.Fleet(["a", "b", "c"], rng=random.Random(0))
    a, b, c = fleet.replicas
    with fleet.sending(a), fleet.sending(a), fleet.sending(b):
        assert {fleet.pick()[0].url for _ in range(50)} == {"c"}
        with fleet.sending(c):
            assert {fleet.pick()[0].url for _ in range(50)} == {"b", "c"}  # ties broken at random
    assert [s.outstanding for s in fleet.status()] == [0, 0, 0]
    assert {fleet.pick()[0].url for _ in range(100)} == {"a", "b", "c"}


def test_requests_spread_over_the_fleet():
    replicas = {u: Replica() for u in ("a:1", "b:1", "c:1")}
    c = fleet_client(replicas)
    for _ in range(60):
        c.rank("cat", [cand("x")])
    counts = [r.infers() for r in replicas.values()]
    assert sum(counts) == 60 and min(counts) >= 8, counts


def test_failing_replica_is_taken_out_and_the_call_retried_elsewhere_at_once(caplog):
    replicas = {"a:1": Replica(errors=[err("UNAVAILABLE", REFUSED)], ready=False), "b:1": Replica()}
    c = fleet_client(replicas, backoff_s=5.0)  # a backoff sleep would blow the time limit below
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="amc_client"):
        for _ in range(20):
            assert c.rank("cat", [cand("x")])[0].model_version == 1
    assert time.monotonic() - start < 2.0
    a = status(c, "a:1")
    assert not a.healthy and a.failures == 1 and "Connection refused" in a.last_error
    assert replicas["b:1"].infers() == 20 - (replicas["a:1"].infers() - 1)
    assert "replica a:1 taken out of rotation (UNAVAILABLE: failed to connect" in caplog.text


def test_ejected_replica_is_probed_back_in_with_backoff(monkeypatch):
    monkeypatch.setattr(_fleet, "PROBE_BACKOFF_S", 0.05)
    replicas = {"a:1": Replica(errors=[err("INTERNAL", "Stub process is not healthy")], ready=False),
                "b:1": Replica()}
    c = fleet_client(replicas)
    while status(c, "a:1").failures == 0:
        c.rank("cat", [cand("x")])
    assert not status(c, "a:1").healthy
    time.sleep(0.1)
    c.rank("cat", [cand("x")])  # a is due: probed, not ready, out again (for twice as long); b answers
    probes = [x for x in replicas["a:1"].calls if x[0] == "is_model_ready"]
    assert len(probes) == 1 and probes[0][1]["model_name"] == "amc"
    assert not status(c, "a:1").healthy
    replicas["a:1"].ready = True
    sent = replicas["a:1"].infers()
    deadline = time.monotonic() + 2
    while replicas["a:1"].infers() == sent and time.monotonic() < deadline:
        c.rank("cat", [cand("x")])
        time.sleep(0.01)
    assert status(c, "a:1").healthy and replicas["a:1"].infers() > sent  # back in rotation, taking calls


def test_probe_backoff_doubles_up_to_the_max():
    now = [0.0]
    fleet = _fleet.Fleet(["a", "b"], rng=random.Random(0), clock=lambda: now[0])
    a = fleet.replicas[0]
    waits = []
    for _ in range(6):
        fleet.probed(a, False)
        waits.append(a.down_until - now[0])
        now[0] = a.down_until
        assert fleet.pick() == (a, True)  # due: handed to one caller for its probe
        assert fleet.pick()[0].url == "b"  # ... and to no other meanwhile
    base = [min(_fleet.PROBE_BACKOFF_S * 2**i, _fleet.MAX_PROBE_BACKOFF_S) for i in range(6)]
    assert base[0] == 0.25 and base[-1] == _fleet.MAX_PROBE_BACKOFF_S
    assert all(0.75 * b <= w <= 1.25 * b for b, w in zip(base, waits, strict=True))
    fleet.probed(a, True)
    assert a.down_until is None and a.ejections == 0


@pytest.mark.parametrize("code, text", [("INVALID_ARGUMENT", "query is empty"),
                                        ("INVALID_ARGUMENT", "Request for unknown model: 'amc_v7'")])
def test_caller_mistakes_are_never_retried_on_another_replica(code, text):
    replicas = {"a:1": Replica(errors=[err(code, text)]), "b:1": Replica(errors=[err(code, text)])}
    c = fleet_client(replicas, retries=3)
    with pytest.raises(InvalidInputError if "empty" in text else Exception, match=text.split(":")[0]):
        c.rank("cat", [cand("x")])
    assert sum(r.infers() for r in replicas.values()) == 1
    assert all(s.healthy and s.failures == 0 for s in c.replicas())


def test_overloaded_replica_is_not_ejected_but_the_retry_goes_elsewhere():
    replicas = {"a:1": Replica(errors=[err("UNAVAILABLE", "Exceeds maximum queue size")] * 50),
                "b:1": Replica(errors=[err("UNAVAILABLE", "Exceeds maximum queue size")] * 50)}
    c = fleet_client(replicas, retries=0)
    with pytest.raises(ServerUnavailableError, match="is overloaded"):
        c.rank("cat", [cand("x")])
    assert [r.infers() for r in replicas.values()] == [1, 1]  # retries + one per other replica, not the same twice
    assert all(s.healthy for s in c.replicas())


def test_every_replica_down_raises_unavailable_naming_one_after_bounded_attempts():
    replicas = {u: Replica(errors=[err("UNAVAILABLE", REFUSED)] * 10, ready=False) for u in ("a:1", "b:1", "c:1")}
    c = fleet_client(replicas, retries=2, timeout_s=3.0)
    with pytest.raises(ServerUnavailableError, match=r"server at [abc]:1 is not reachable"):
        c.rank("cat", [cand("x")])
    assert sum(r.infers() for r in replicas.values()) == 2 + 3  # retries + one first attempt per replica
    assert not any(s.healthy for s in c.replicas())


def test_a_replica_that_stops_answering_leaves_time_for_another():
    replicas = {"a:1": Replica(hang_s=5.0, ready=False), "b:1": Replica()}
    c = fleet_client(replicas, timeout_s=1.0)
    for _ in range(30):  # until the balancer has picked the silent one (each pick is a coin toss while healthy)
        start = time.monotonic()
        assert c.rank("cat", [cand("x")])[0].candidate_id == "x"
        assert time.monotonic() - start < 0.9  # half the deadline on the silent one, then the retry elsewhere
        if replicas["a:1"].infers():
            break
    assert replicas["a:1"].infers() == 1 and not status(c, "a:1").healthy and "DEADLINE_EXCEEDED" in status(c, "a:1").last_error
    # one replica: the attempt gets the whole deadline, and a missed deadline is not retried (as before)
    one = AMCClient("a:1", _inner=Replica(hang_s=5.0), timeout_s=0.3, backoff_s=0.0)
    with pytest.raises(DeadlineExceededError):
        one.rank("cat", [cand("x")])
    assert one._inner.infers() == 1


def test_one_url_never_ejects_and_retries_as_before():
    fake = Replica(errors=[err("UNAVAILABLE", REFUSED)] * 2, ready=False)
    c = AMCClient("a:1", _inner=fake, retries=3, backoff_s=0.0)
    assert c.rank("cat", [cand("x")])[0].candidate_id == "x"
    assert fake.infers() == 3 and not any(name == "is_model_ready" for name, _ in fake.calls)
    assert c.replicas()[0].healthy


def test_async_client_fleet_fails_over():
    replicas = {"a:1": Replica(errors=[err("UNAVAILABLE", REFUSED)] * 10, ready=False), "b:1": Replica()}

    def async_fake(sync):
        class AsyncFake:
            def __getattr__(self, name):
                async def call(*a, **kw):
                    return getattr(sync, name)(*a, **kw)

                return call

        return AsyncFake()

    async def main():
        async with AsyncAMCClient(list(replicas), _inner={u: async_fake(r) for u, r in replicas.items()},
                                  backoff_s=0.0) as c:
            results = [await c.rank("cat", [cand("x")]) for _ in range(10)]
            return results, c.replicas()

    results, statuses = asyncio.run(main())
    assert len(results) == 10 and replicas["a:1"].infers() == 1 and replicas["b:1"].infers() == 10
    assert [s.healthy for s in statuses] == [False, True]


def test_rollout_takes_every_replica_and_refuses_a_duplicate_or_empty_entry(tmp_path, capsys):
    from serving.rollout import RolloutError, main, rollout_urls

    assert rollout_urls("127.0.0.1:8001") == ["127.0.0.1:8001"]
    assert rollout_urls(["a:1,b:1", "c:1"]) == ["a:1", "b:1", "c:1"]
    with pytest.raises(RolloutError, match="replica a:1 is listed more than once"):
        rollout_urls(["a:1", "b:1,a:1"])
    with pytest.raises(RolloutError, match="non-empty"):
        rollout_urls("a:1,")
    assert main(["--repository", str(tmp_path), "--url", "a:1", "--url", "a:1", "status"]) == 2
    assert "replica a:1 is listed more than once" in capsys.readouterr().err


# ---- integration: 2 real tritonservers on one repository -----------------------------------------------------
