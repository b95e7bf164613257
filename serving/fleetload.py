"""A fleet under load: replicas on one repository, one killed with SIGKILL and restarted, then a rollout.

    python -m serving.fleetload --old runs/amc/checkpoint.pt --new runs/amc-seed1/checkpoint.pt \
        --out reports/fleet.json

Publishes ``--old`` as version 1 into one repository and starts ``--replicas`` real tritonservers on it (own
ports, admin key set). ``--clients`` threads share one fleet :class:`amc_client.AMCClient` over all the
replicas and rank queries for the whole test (the load of :mod:`serving.loadtest`). Meanwhile:

1. the last replica is killed with SIGKILL (its whole process group: the server and its Python-backend
   stubs, as when a machine dies); the others must keep answering every request;
2. it is restarted on the same ports; ``killed_replica_recovered_s`` is the time from the moment it answers
   ``amc`` ready again (Triton's ``/v2/models/amc/ready``, a fresh HTTP connection every 5 ms: a gRPC channel
   would see it late, after its reconnect backoff) to the moment the client has sent it an inference again
   (its request count in ``client.replicas()``, polled in the same loop);
3. ``amc-rollout`` rolls ``--new`` out across the fleet: publish once, load and verify on every replica,
   ``--share`` canary, promote (``rollout_s``: publish to promoted, as in ``reports/rollout.json``).

Writes ``{"replicas", "requests", "failed_requests", "mixed_version_responses", "killed_replica_recovered_s",
"rollout_s"}``; the details (phases, per-replica counts, errors) go to stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from amc_client import AMCClient
from amc_contract import signatures as sig
from export.publish import publish
from serving.loadtest import ADMIN_KEY, Load, argument_parser, collection_words, roll_out, serving_models
from serving.rollout import Rollout
from serving.server import TritonServer

POLL_S = 0.005


def _requests(client: AMCClient, url: str) -> int:
    return next(s.requests for s in client.replicas() if s.url == url)


def kill(server: TritonServer) -> None:
    """SIGKILL the server's whole process group (tritonserver and its stubs)."""
    assert server.pid is not None
    os.killpg(server.pid, signal.SIGKILL)


def restart_and_time_recovery(server: TritonServer, client: AMCClient, timeout_s: float = 300) -> dict:
    """Restart ``server`` (on its ports) and time how soon ``client`` sends it a request after it answers ready.

    The restart runs in a thread; this one polls the replica's readiness (``amc``'s, what the client's probe
    asks, over HTTP: a new connection each time, so no reconnect backoff delays it) and the client's
    inference count for it, each every ``POLL_S``."""
    url = server.grpc_url
    sent_before = _requests(client, url)
    failed: list[BaseException] = []

    def restart() -> None:
        try:
            server.restart()
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)

    thread = threading.Thread(target=restart, daemon=True)
    t_restart = time.monotonic()
    thread.start()
    t_ready = t_back = None
    deadline = time.monotonic() + timeout_s
    while t_back is None:
        if failed:
            raise RuntimeError(f"restarting replica {url} failed: {failed[0]}") from failed[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"replica {url}: ready at {t_ready}, no request from the client in {timeout_s} s")
        if t_ready is None and server.http_ok(f"/v2/models/{sig.ENSEMBLE_NAME}/ready", timeout_s=1.0):
            t_ready = time.monotonic()
        if _requests(client, url) > sent_before:
            t_back = time.monotonic()
            t_ready = t_ready if t_ready is not None else t_back  # both within one poll
        time.sleep(POLL_S)
    thread.join(timeout=timeout_s)
    return {"restart_to_ready_s": round(t_ready - t_restart, 2), "recovered_s": round(max(0.0, t_back - t_ready), 3)}


def run(old_checkpoint: Path, new_checkpoint: Path, workdir: Path, *, replicas: int = 3, clients: int = 4,
        share: float = 0.1, canary_requests: int = 300, ndcg_margin: float = 0.02, log=print) -> dict:
    """The scenario; returns the figures of ``reports/fleet.json`` plus ``details``."""
    if replicas < 2:
        raise ValueError(f"a fleet needs at least 2 replicas, got {replicas}")
    repository = workdir / "repository"
    v1 = publish(old_checkpoint, repository, log=log)
    words = collection_words(repository, v1)
    servers = [TritonServer(repository, models=serving_models(v1), admin_key=ADMIN_KEY) for _ in range(replicas)]
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
        with ThreadPoolExecutor(replicas) as pool:
            list(pool.map(lambda s: s.start(timeout_s=600), servers))
        urls = [s.grpc_url for s in servers]
        log(f"{replicas} replicas ready: {', '.join(urls)}")
        client = stack.enter_context(AMCClient(urls, timeout_s=30, routing_refresh_s=0.2))
        load = Load(urls, clients=clients, client=client)
        load.start(words)
        stack.callback(load.stop)
        t_start = time.monotonic()
        load.wait_for(100, t_start)

        victim = servers[-1]
        kill(victim)
        t_killed = time.monotonic()
        log(f"killed replica {victim.grpc_url} (SIGKILL)")
        load.wait_for(100, t_killed)
        recovery = restart_and_time_recovery(victim, client)
        log(f"replica {victim.grpc_url} restarted: {recovery}")
        t_recovered = time.monotonic()
        load.wait_for(100, t_recovered)

        with Rollout(repository, urls, admin_key=ADMIN_KEY, ndcg_margin=ndcg_margin, log=log) as rollout:
            v2, phases = roll_out(rollout, load, new_checkpoint, share, canary_requests)
        load.wait_for(100, phases.promoted)
        load.stop()
        t_end = time.monotonic()
        statuses = client.replicas()

    records, failed, mixed = load.records, load.failed(), load.mixed()
    after_promote = load.between(phases.promoted, t_end)
    return {
        "replicas": replicas,
        "requests": len(records),
        "failed_requests": len(failed),
        "mixed_version_responses": len(mixed),
        "killed_replica_recovered_s": recovery["recovered_s"],
        "rollout_s": round(phases.promoted - phases.started, 2),
        "details": {
            "clients": clients,
            "duration_s": round(t_end - t_start, 1),
            "requests_while_killed": len(load.between(t_killed, t_recovered)),
            "killed_restart_to_ready_s": recovery["restart_to_ready_s"],
            "after_promote_from_new": sum(r.version == v2 for r in after_promote),
            "after_promote_total": len(after_promote),
            "replica_requests": {s.url: s.requests for s in statuses},
            "replica_failures": {s.url: s.failures for s in statuses},
            "old_version": v1,
            "new_version": v2,
            "errors": sorted({r.error for r in failed + mixed if r.error})[:5],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("python -m serving.fleetload", __doc__, "reports/fleet.json")
    parser.add_argument("--replicas", type=int, default=3, help="tritonservers on the one repository (>= 2)")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error(f"--replicas must be at least 2 (a fleet), got {args.replicas}")
    for path in (args.old, args.new):
        if not path.is_file():
            parser.error(f"checkpoint {path} does not exist (make train, or see make fleet-report)")
    with tempfile.TemporaryDirectory(prefix="amc-fleetload-") as tmp:
        report = run(args.old, args.new, Path(tmp), replicas=args.replicas, clients=args.clients, share=args.share,
                     ndcg_margin=args.ndcg_margin)
    details = report.pop("details")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({**report, "details": details}, indent=2))
    return 0 if report["failed_requests"] == 0 and report["mixed_version_responses"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
