"""The client's fleet of replicas on 2 real tritonservers: a replica killed mid-stream, a stub killed under load,
rollouts across both, and a third replica that cannot load the version (the balancer on fake replicas:
tests/unit/test_fleet.py)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import amc_client
from amc_client import AMCClient
from tests.unit.test_client import cand
from tests.unit.test_fleet import status

KEY = "fleet-test-key"


@pytest.fixture(scope="module")
def fleet(trained, tmp_path_factory):
    from export.publish import publish
    from serving.loadtest import serving_models
    from serving.server import TritonServer

    repository = tmp_path_factory.mktemp("fleet") / "repository"
    v1 = publish(trained.checkpoint, repository, log=lambda *_: None)
    servers = [TritonServer(repository, models=serving_models(v1), admin_key=KEY) for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:  # the two start at once
            list(pool.map(lambda s: s.start(), servers))
        yield repository, servers
    finally:
        for server in servers:
            server.stop()


def _load(servers, repository):
    from serving.loadtest import Load, collection_words

    urls = [s.grpc_url for s in servers]
    client = AMCClient(urls, timeout_s=30, routing_refresh_s=0.2)
    load = Load(urls, clients=2, client=client)
    load.start(collection_words(repository, 1))
    return client, load


def _served_version(url) -> int:
    with AMCClient(url, timeout_s=30) as one:
        return one.rank("cat face", [cand("x", 0.1, keywords=("cat",))])[0].model_version


def test_a_killed_replica_costs_no_request_and_is_back_in_rotation_once_ready(fleet):
    from serving.fleetload import kill, restart_and_time_recovery
    from serving.rollout import Rollout, RolloutError

    repository, servers = fleet
    client, load = _load(servers, repository)
    try:
        load.wait_for(20, time.monotonic())
        victim = servers[1]
        kill(victim)
        t_killed = time.monotonic()
        load.wait_for(40, t_killed)
        assert not status(client, victim.grpc_url).healthy
        # A routing change needs every replica ready: refused, the dead one named, nothing changed.
        with Rollout(repository, [s.grpc_url for s in servers], admin_key=KEY, log=lambda *_: None) as rollout:
            with pytest.raises(RolloutError, match=f"replica {victim.grpc_url}: failed to connect"):
                rollout.promote(1)
            assert rollout.routing() == amc_client.Routing(1)
        recovery = restart_and_time_recovery(victim, client)
        assert recovery["recovered_s"] < 5.0, recovery
        t_back = time.monotonic()
        load.wait_for(20, t_back)
    finally:
        load.stop()
        client.close()
    assert [r.error for r in load.records if r.error] == []
    assert len(load.between(t_killed, t_back)) >= 40 and all(r.version == 1 for r in load.records)
    assert status(client, victim.grpc_url).healthy


def test_a_killed_stub_costs_no_request_with_two_replicas(fleet):
    """Issue 9's fleet target: one replica's text-step stub killed with SIGKILL under 4 client threads. The fleet
    client retries what that replica fails on the other one (the stub's INTERNAL error is a server fault, never
    the caller's), so no request fails; the replica's supervisor repairs it (a reload, or a restart where
    tritonserver itself aborted on the stub's death)."""
    from amc_contract import signatures as sig
    from serving import faults
    from serving.loadtest import Load, collection_words
    from serving.supervisor import Supervisor

    repository, servers = fleet
    victim = servers[0]
    supervisor = Supervisor(victim, interval_s=1.0).start()
    urls = [s.grpc_url for s in servers]
    client = AMCClient(urls, timeout_s=30, routing_refresh_s=0.2)
    load = Load(urls, clients=4, client=client)
    try:
        deadline = time.monotonic() + 120
        while not supervisor.ready:
            assert time.monotonic() < deadline, supervisor.reason
            time.sleep(0.2)
        load.start(collection_words(repository, 1))
        load.wait_for(20, time.monotonic())
        stub = next(s for s in faults.stubs(victim.pid) if s.model == sig.TOKENIZER.model_name)
        t_killed = time.monotonic()
        faults.kill(stub.pid)
        while not (supervisor.repairs and supervisor.ready):
            assert time.monotonic() < t_killed + 90, (supervisor.repairs, supervisor.reason)
            time.sleep(0.2)
        load.wait_for(40, time.monotonic())
        t_end = time.monotonic()
    finally:
        load.stop()
        client.close()
        supervisor.stop()
    print(f"stub kill with two replicas: {len(load.records)} requests, {len(load.between(t_killed, t_end))} after "
          f"the kill, {len(load.failed())} failed; repairs {supervisor.repairs}")
    assert [r.error for r in load.records if r.error] == []
    assert len(load.between(t_killed, t_end)) >= 40 and all(r.version == 1 for r in load.records)
    assert supervisor.repairs[0].ok, supervisor.repairs
    assert victim.poll() is None


def test_rollout_across_the_fleet_canary_promote_rollback_and_a_failure_undone_on_every_replica(
        fleet, trained_other):
    from serving.rollout import Rollout, RolloutError, admin_headers

    repository, servers = fleet
    urls = [s.grpc_url for s in servers]
    client, load = _load(servers, repository)
    try:
        with Rollout(repository, urls, admin_key=KEY, ndcg_margin=1.0, log=lambda *_: None) as rollout:
            v = rollout.publish(trained_other.checkpoint)  # once, then loaded and verified on both
            assert rollout.ready(v)
            rollout.canary(v, 0.5)
            for url in urls:  # every replica's amc carries the canary routing
                with AMCClient(url) as one:
                    assert one.routing() == amc_client.Routing(1, v, 0.5)
            load.wait_for(40, time.monotonic() + 0.2)
            rollout.promote()
            t_promoted = time.monotonic()
            assert [_served_version(u) for u in urls] == [v, v]
            load.wait_for(20, t_promoted)
            t_rollback = time.monotonic()
            rollout.rollback()
            t_rolled_back = time.monotonic()
            assert [_served_version(u) for u in urls] == [1, 1]
            # A version that fails its checks (here the NDCG gate) is unloaded from every replica.
            manifest = repository / "amc_v1" / "manifest.json"
            serving = json.loads(manifest.read_text())
            serving["metrics"]["test_ndcg@10"] = 2.0
            manifest.write_text(json.dumps(serving))
            rollout.ndcg_margin = 0.02
            with pytest.raises(RolloutError, match="below serving version 1"):
                rollout.canary(v, 0.5)
            for url in urls:
                with AMCClient(url, headers=admin_headers(KEY)) as one:
                    assert one.model_versions() == [1] and one.routing() == amc_client.Routing(1)
            load.wait_for(20, time.monotonic())
    finally:
        load.stop()
        client.close()
    assert [r.error for r in load.records if r.error] == []
    assert {r.version for r in load.records} == {1, v}
    assert all(r.version == v for r in load.between(t_promoted, t_rollback))
    assert all(r.version == 1 for r in load.between(t_rolled_back, time.monotonic()))


def test_a_replica_that_cannot_load_the_version_undoes_the_rollout_everywhere_naming_it(fleet, trained_other,
                                                                                         tmp_path):
    """Issue 11's bad input: one replica of three serves a stale copy of the repository (a volume that missed
    the publish), so it cannot load the new version; the rollout is undone on every replica, the error names
    that replica, and the fleet keeps serving the old version without a failed request."""
    import shutil

    from serving.loadtest import serving_models
    from serving.rollout import Rollout, RolloutError, admin_headers
    from serving.server import TritonServer

    repository, servers = fleet
    stale = tmp_path / "stale-repository"
    shutil.copytree(repository, stale, ignore=shutil.ignore_patterns(".failed"))
    with TritonServer(stale, models=serving_models(1), admin_key=KEY) as third:
        urls = [s.grpc_url for s in servers] + [third.grpc_url]
        client, load = _load([*servers, third], repository)
        try:
            with Rollout(repository, urls, admin_key=KEY, log=lambda *_: None) as rollout, \
                    pytest.raises(RolloutError) as failed:
                rollout.publish(trained_other.checkpoint)
            message = str(failed.value)
            assert third.grpc_url in message and "did not become ready" in message, message
            assert all(s.grpc_url not in message for s in servers), message
            for url in urls:  # undone everywhere: only version 1 is loaded, amc routes to it alone
                with AMCClient(url, headers=admin_headers(KEY)) as one:
                    assert one.model_versions() == [1] and one.routing() == amc_client.Routing(1)
            assert [p.name for p in (repository / ".failed").iterdir()], "the failed version moved aside"
            load.wait_for(20, time.monotonic())
        finally:
            load.stop()
            client.close()
    assert [r.error for r in load.records if r.error] == []
    assert {r.version for r in load.records} == {1}
