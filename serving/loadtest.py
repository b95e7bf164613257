"""Rollout under load: publish, canary, promote and roll back while clients keep querying.

    python -m serving.loadtest --old runs/amc/checkpoint.pt --new runs/amc-seed1/checkpoint.pt \
        --out reports/rollout.json

Starts a real tritonserver (admin key set) serving ``--old`` as version 1, runs ``--clients`` threads that
each rank queries through their own :class:`amc_client.AMCClient` for the whole test, and meanwhile
publishes ``--new`` (export, load, verify), sends it ``--share`` of traffic, promotes it and rolls it back.
Every response is recorded with the time it was sent and the version that scored it; a phase's figures
use only requests sent after the operation that started the phase had returned (plus the clients'
routing refresh interval for the canary share). Writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amc_client import AMCClient, AMCError, Candidate, MixedVersionError
from amc_contract import signatures as sig
from amc_contract.text import TermWeights
from export.publish import publish
from export.repository import STEPS
from serving.rollout import Rollout
from serving.server import TritonServer

ADMIN_KEY = "loadtest-admin-key"


@dataclass
class Record:
    sent: float
    version: int | None
    error: str | None = None


@dataclass
class Load:
    """Client threads ranking queries until stopped; each keeps its own client (or all share ``client``, which
    they then leave open) and records."""

    url: str | list[str]
    clients: int = 4
    candidates: int = 5
    routing_refresh_s: float = 0.2
    client: AMCClient | None = None
    records: list[Record] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, words: list[str]) -> None:
        """Start the clients; queries and keywords are drawn from ``words``."""
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i, words), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, seed: int, words: list[str]) -> None:
        rng = np.random.default_rng(seed)
        cands = [Candidate(id=str(j), regions=np.abs(rng.normal(size=(sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM)))
                           .astype(np.float32), keywords=list(rng.choice(words, size=3)))
                 for j in range(self.candidates)]
        with (contextlib.nullcontext(self.client) if self.client is not None
              else AMCClient(self.url, timeout_s=30, routing_refresh_s=self.routing_refresh_s)) as client:
            while not self._stop.is_set():
                query = " ".join(rng.choice(words, size=2))
                sent = time.monotonic()
                try:
                    version = client.rank(query, cands)[0].model_version
                    record = Record(sent, version)
                except MixedVersionError as e:
                    record = Record(sent, sig.MIXED_VERSION, f"mixed: {e}")
                except AMCError as e:
                    record = Record(sent, None, f"{type(e).__name__}: {e}")
                with self._lock:
                    self.records.append(record)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def count_since(self, t: float) -> int:
        with self._lock:
            return sum(r.sent >= t for r in self.records)

    def wait_for(self, count: int, since: float, timeout_s: float = 120) -> None:
        """Block until ``count`` requests were sent after ``since``; a stalled server is an error, not a pass."""
        deadline = time.monotonic() + timeout_s
        while self.count_since(since) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.count_since(since)} of {count} requests in {timeout_s} s: "
                                   "the server stalled")
            time.sleep(0.05)

    def between(self, start: float, end: float) -> list[Record]:
        with self._lock:
            return [r for r in self.records if start <= r.sent < end]

    def failed(self) -> list[Record]:
        """Requests that raised, mixed-version responses aside."""
        with self._lock:
            return [r for r in self.records if r.error and r.version != sig.MIXED_VERSION]

    def mixed(self) -> list[Record]:
        """Mixed-version responses (model_version -1, refused by the client)."""
        with self._lock:
            return [r for r in self.records if r.version == sig.MIXED_VERSION]


def collection_words(repository: Path, version: int) -> list[str]:
    """The words of the candidate collection a published version's term weights were counted over."""
    path = repository / sig.TOKENIZER.model_name / str(version) / "term_weights.json"
    return sorted(TermWeights.from_json(path.read_text(encoding="utf-8")).df) or ["cat", "face"]


def serving_models(version: int) -> list[str]:
    """What a server loads at start to serve ``version``: the steps, the pinned ensemble and ``amc``."""
    return [s.model_name for s in STEPS] + [sig.versioned_ensemble_name(version), sig.ENSEMBLE_NAME]


@dataclass
class Phases:
    """When each step of :func:`roll_out` started and returned (``time.monotonic()``)."""

    started: float
    published: float
    canary: float
    canary_end: float
    promoted: float


def roll_out(rollout: Rollout, load: Load, checkpoint: Path, share: float, canary_requests: int) -> tuple[int, Phases]:
    """Publish ``checkpoint`` (export, load, verify), give it ``share`` of the traffic until ``canary_requests``
    were sent under the canary routing, then promote it; ``load`` runs throughout."""
    t0 = time.monotonic()
    version = rollout.publish(checkpoint)
    t_published = time.monotonic()
    rollout.canary(version, share)
    t_canary = time.monotonic()
    load.wait_for(canary_requests, t_canary + load.routing_refresh_s)
    t1 = time.monotonic()
    rollout.promote(version)
    return version, Phases(t0, t_published, t_canary, t1, time.monotonic())


def run(old_checkpoint: Path, new_checkpoint: Path, workdir: Path, *, clients: int = 4, share: float = 0.1,
        canary_requests: int = 800, ndcg_margin: float = 0.02, log=print) -> dict:
    """The scenario; returns the figures (also the shape of reports/rollout.json)."""
    repository = workdir / "repository"
    v1 = publish(old_checkpoint, repository, log=log)
    words = collection_words(repository, v1)
    with TritonServer(repository, models=serving_models(v1), admin_key=ADMIN_KEY) as server, \
            Rollout(repository, server.grpc_url, admin_key=ADMIN_KEY, ndcg_margin=ndcg_margin, log=log) as rollout:
        load = Load(server.grpc_url, clients=clients)
        load.start(words)
        t_start = time.monotonic()
        load.wait_for(100, t_start)

        v2, phases = roll_out(rollout, load, new_checkpoint, share, canary_requests)
        t0, t_published, t_canary, t1, t_promoted = (phases.started, phases.published, phases.canary,
                                                     phases.canary_end, phases.promoted)
        load.wait_for(200, t_promoted)
        t2 = time.monotonic()
        rollout.rollback()
        t_rolled_back = time.monotonic()
        load.wait_for(200, t_rolled_back)
        load.stop()
        t_end = time.monotonic()

    records, failed, mixed = load.records, load.failed(), load.mixed()
    canary_phase = load.between(t_canary + load.routing_refresh_s, t1)
    promoted_phase = load.between(t_promoted, t2)
    rolled_back_phase = load.between(t_rolled_back, t_end)
    report = {
        "requests": len(records),
        "failed_requests": len(failed),
        "mixed_version_responses": len(mixed),
        "canary_share": float(np.mean([r.version == v2 for r in canary_phase])) if canary_phase else 0.0,
        "rollout_s": round(t_promoted - t0, 2),
        "rollback_s": round(t_rolled_back - t2, 2),
        "target_canary_share": share,
        "canary_requests": len(canary_phase),
        "publish_load_verify_s": round(t_published - t0, 2),
        "canary_s": round(t_canary - t_published, 2),
        "promote_s": round(t_promoted - t1, 2),
        "after_promote_from_new": int(sum(r.version == v2 for r in promoted_phase)),
        "after_promote_total": len(promoted_phase),
        "after_rollback_from_old": int(sum(r.version == v1 for r in rolled_back_phase)),
        "after_rollback_total": len(rolled_back_phase),
        "clients": clients,
        "duration_s": round(t_end - t_start, 1),
        "old_version": v1,
        "new_version": v2,
        "errors": sorted({r.error for r in failed})[:5],
    }
    return report


def argument_parser(prog: str, doc: str, out: str) -> argparse.ArgumentParser:
    """The options a rollout load test takes (this one's and ``serving.fleetload``'s)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="checkpoint serving at the start")
    parser.add_argument("--new", type=Path, required=True, help="checkpoint rolled out")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--share", type=float, default=0.1, help="canary share during the rollout")
    parser.add_argument("--ndcg-margin", type=float, default=0.02, help="rollout verification's NDCG margin")
    return parser


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = argument_parser("python -m serving.loadtest", __doc__, "reports/rollout.json").parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="amc-loadtest-") as tmp:
        report = run(args.old, args.new, Path(tmp), clients=args.clients, share=args.share,
                     ndcg_margin=args.ndcg_margin)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["failed_requests"] == 0 and report["mixed_version_responses"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
