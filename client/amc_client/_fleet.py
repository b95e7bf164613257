"""A fleet of Triton replicas, seen from the client: which replica each call goes to, and which are out.

The client takes one URL (today's behaviour, unchanged: one channel, every attempt to it), a list of URLs
(``["10.0.0.1:8001", "10.0.0.2:8001"]`` or ``"10.0.0.1:8001,10.0.0.2:8001"``) or one DNS name with gRPC's
``dns:///`` scheme (``"dns:///amc.ns.svc:8001"``, e.g. a Kubernetes headless Service), resolved once, when the
client is made, to every address it has. Several replicas make a fleet:

* **Least outstanding requests.** Each call goes to the healthy replica with the fewest calls this client has
  in flight on it (ties broken at random), so a slow or busy replica gets less.
* **Ejection.** A replica that fails a call with a server fault (UNAVAILABLE other than a full queue,
  INTERNAL, UNKNOWN: connection refused, a killed server, a dead step) or lets an attempt's deadline pass is
  taken out of rotation; the call is retried at once on another replica, within the caller's ``timeout_s``
  (an inference is idempotent). A full queue ("Exceeds maximum queue size", RESOURCE_EXHAUSTED) moves the retry
  to another replica but does not eject: the replica is up, only busy. The caller's mistakes
  (INVALID_ARGUMENT, an unknown model, a request over the message limit) are never retried, anywhere.
* **Probe back in.** An ejected replica is probed on use: the first call after its backoff (0.25 s, doubling to
  at most 1 s while it keeps failing) first asks it whether ``amc`` is ready (a 1 s readiness call); ready, it
  is back in rotation and takes that call; not, it stays out for a longer backoff. Channels of a fleet
  reconnect at most ``MAX_RECONNECT_BACKOFF_MS`` apart (gRPC's default grows to 120 s), so a restarted replica
  is reached as soon as it answers. (The call that probes a replica which accepts connections but never
  answers waits for its probe: at most 1 s, at most once per backoff.)
* **When every replica is out** the client still tries the one due soonest, with the retry backoff between
  attempts: a fleet never refuses a call without trying.

Canary routing is unchanged: the routing is read from ``amc``'s config on whichever replica answers (every
replica's ``amc`` carries the same, written by ``amc-rollout``), and every response is scored on one replica
by one version (its ``model_version`` says which; -1, a mixed response, is refused as before).

With one replica none of this applies: no ejection, no probe, the same retries and backoff as before.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tritonclient.utils import InferenceServerException

from amc_contract import signatures as sig

from . import _calls
from ._calls import Call, Deadline, Steps
from .errors import InvalidInputError

log = logging.getLogger("amc_client")

DNS_SCHEME = "dns:///"
# Backoff of an ejected replica before its next readiness probe: doubles per failed probe, up to the max.
PROBE_BACKOFF_S = 0.25
MAX_PROBE_BACKOFF_S = 1.0
# A readiness probe waits at most this long (a replica that accepts connections but never answers).
PROBE_TIMEOUT_S = 1.0
# With another replica to go to, one attempt waits at most this share of the time left, so that a replica
# that stops answering leaves time for the retry elsewhere.
ATTEMPT_SHARE = 0.5
# gRPC reconnects a failed channel with exponential backoff up to 120 s by default: a replica restarted after
# a minute would then be unreachable for up to two more. Fleet channels retry the connection at most 0.5 s
# apart. Together with the probe backoff this bounds how late a restarted replica is seen: about 1.5 s.
MAX_RECONNECT_BACKOFF_MS = 500
RECONNECT_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]


def replica_urls(url: str | Sequence[str], *, resolve: Callable[..., Any] = socket.getaddrinfo) -> list[str]:
    """The replicas' ``host:port`` addresses: one URL as given; a list (or a comma-separated string) with its
    duplicates dropped (each one logged); ``dns:///host:port`` resolved to each of its addresses."""
    items = url.split(",") if isinstance(url, str) else list(url)
    if not items or any(not isinstance(u, str) for u in items):
        raise InvalidInputError(f"url must be 'host:port', a list of them or 'dns:///host:port', got {url!r}")
    urls: list[str] = []
    for raw in items:
        u = raw.strip()
        if not u:
            raise InvalidInputError(f"url list {url!r} has an empty entry")
        for address in _resolve(u, resolve) if u.startswith(DNS_SCHEME) else [u]:
            if address in urls:
                log.warning("replica %s is listed more than once; using it once", address)
            else:
                urls.append(address)
    return urls


def _resolve(url: str, resolve: Callable[..., Any]) -> list[str]:
    target = url[len(DNS_SCHEME) :]
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise InvalidInputError(f"{url!r}: a DNS target is 'dns:///host:port'")
    try:
        infos = resolve(host, int(port), type=socket.SOCK_STREAM)
    except OSError as e:
        raise InvalidInputError(f"{url!r}: cannot resolve {host!r}: {e}") from e
    addresses = []
    for family, *_, sockaddr in infos:
        address = f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InvalidInputError(f"{url!r}: {host!r} resolves to no address")
    return addresses


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as the client sees it (no I/O: what its calls so far have shown).

    ``healthy``: in rotation. ``outstanding``: this client's calls in flight on it. ``requests``: inferences sent
    to it. ``failures``: calls it failed (server faults, missed deadlines; not the caller's mistakes).
    ``last_error``: the last failure ("" if none).
    """

    url: str
    healthy: bool
    outstanding: int
    requests: int
    failures: int
    last_error: str


class Replica:
    """One replica's state. ``client`` is the face's tritonclient for it (opened by the face)."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.url = url
        self.client = client
        self.outstanding = 0
        self.requests = 0
        self.failures = 0
        self.last_error = ""
        self.ejections = 0  # consecutive: the probe backoff grows with it
        self.down_until: float | None = None  # None: in rotation
        self.probing = False

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(self.url, self.down_until is None, self.outstanding, self.requests, self.failures,
                             self.last_error)


class Fleet:
    """The replicas and the balancer over them. Thread-safe (one lock, never held across I/O)."""

    def __init__(self, urls: Sequence[str], *, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.replicas = [Replica(u) for u in urls]
        self._rng = rng or random.Random()
        self._clock = clock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.replicas)

    @property
    def url(self) -> str:
        """How messages name the fleet: its one URL, or its URLs joined by commas."""
        return ",".join(r.url for r in self.replicas)

    def status(self) -> list[ReplicaStatus]:
        with self._lock:
            return [r.status() for r in self.replicas]

    # ---- choosing --------------------------------------------------------------------------------------
    def pick(self, avoid: Replica | None = None) -> tuple[Replica, bool]:
        """The replica for the next attempt, and whether it must be probed first (it was out and is due).

        A due replica is handed to one caller for its probe; otherwise the healthy replica with the fewest
        outstanding calls (not ``avoid``, the one that just failed, while another is healthy); with none
        healthy, the one due soonest.
        """
        if len(self.replicas) == 1:
            return self.replicas[0], False
        with self._lock:
            now = self._clock()
            due = [r for r in self.replicas if r.down_until is not None and not r.probing and r.down_until <= now]
            if due:
                replica = min(due, key=lambda r: r.down_until or 0.0)
                replica.probing = True
                return replica, True
            healthy = [r for r in self.replicas if r.down_until is None]
            if len(healthy) > 1 and avoid in healthy:
                healthy.remove(avoid)
            if healthy:
                fewest = min(r.outstanding for r in healthy)
                return self._rng.choice([r for r in healthy if r.outstanding == fewest]), False
            return min(self.replicas, key=lambda r: r.down_until or 0.0), False

    def attempt_s(self, remaining: float, replica: Replica) -> float:
        """How long one attempt on ``replica`` may wait: all the time left, unless another replica is healthy."""
        if len(self.replicas) == 1:
            return remaining
        with self._lock:
            others = any(r.down_until is None and r is not replica for r in self.replicas)
        return remaining * ATTEMPT_SHARE if others else remaining

    def healthy_besides(self, replica: Replica) -> bool:
        with self._lock:
            return any(r.down_until is None and r is not replica for r in self.replicas)

    # ---- outcomes --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def sending(self, replica: Replica, inference: bool = True) -> Iterator[None]:
        """Count one call (an inference or not) in flight on ``replica`` while the block runs."""
        with self._lock:
            replica.outstanding += 1
            replica.requests += inference
        try:
            yield
        finally:
            with self._lock:
                replica.outstanding -= 1

    def failed(self, replica: Replica, e: InferenceServerException) -> None:
        """Record a failed call; eject the replica if the failure is its fault (see the module docstring)."""
        if not retry_elsewhere(e):
            return  # the caller's mistake, not the replica's
        with self._lock:
            replica.failures += 1
            replica.last_error = f"{_calls.status(e)}: {_calls.message(e)}"
        if len(self.replicas) > 1 and ejects(e):
            self._eject(replica, replica.last_error)

    def probed(self, replica: Replica, ready: bool, why: str = "") -> None:
        if ready:
            with self._lock:
                replica.down_until, replica.ejections, replica.probing = None, 0, False
            log.info("replica %s is ready again: back in rotation", replica.url)
        else:
            self._eject(replica, why or "not ready")

    def _eject(self, replica: Replica, why: str) -> None:
        with self._lock:
            if replica.down_until is not None and not replica.probing and replica.down_until > self._clock():
                return  # already out: a late failure of a call sent before does not lengthen its backoff
            backoff = min(PROBE_BACKOFF_S * 2**replica.ejections, MAX_PROBE_BACKOFF_S)
            backoff *= 0.75 + 0.5 * self._rng.random()  # jitter: clients don't probe in step
            first = replica.down_until is None
            replica.down_until = self._clock() + backoff
            replica.ejections += 1
            replica.probing = False
        if first:
            log.warning("replica %s taken out of rotation (%s); probing it again in %.2f s", replica.url, why,
                        backoff)

    # ---- the request path's part ------------------------------------------------------------------------
    def choose(self, deadline: Deadline, avoid: Replica | None = None) -> Steps:
        """Pick the replica for the next attempt, probing a due one first (a core request path's step)."""
        while True:
            replica, probe = self.pick(avoid)
            if not probe:
                return replica
            timeout = min(PROBE_TIMEOUT_S, max(deadline.remaining(), 0.0))
            ready, why = False, "not ready"
            try:
                ready = bool((yield Call("is_model_ready", timeout, {"args": (sig.ENSEMBLE_NAME,)}, replica)))
            except InferenceServerException as e:
                why = f"{_calls.status(e)}: {_calls.message(e)}"
            finally:  # also when the caller gives up mid-probe: the replica is never left marked as probing
                self.probed(replica, ready, why)
            if ready:
                return replica


def ejects(e: InferenceServerException) -> bool:
    """Whether a failed call takes its replica out of rotation: a fault of the replica, not of the request,
    and not a full queue (the replica is up and answered at once)."""
    code = _calls.status(e)
    if code == "DEADLINE_EXCEEDED":
        return True
    return _calls.retryable(e) and code != "RESOURCE_EXHAUSTED" and not _calls.overloaded(e)


def retry_elsewhere(e: InferenceServerException) -> bool:
    """Whether a fleet retries a failed call on another replica: server faults, and a missed attempt deadline
    (one replica stopped answering; the caller's deadline may still leave time)."""
    return _calls.retryable(e) or _calls.status(e) == "DEADLINE_EXCEEDED"


def clients_by_url(inner: Any, urls: Sequence[str]) -> dict[str, Any]:
    """Test doubles given as ``_inner``: one object (one URL) or a mapping ``{url: client}``."""
    if isinstance(inner, Mapping):
        return {u: inner.get(u) for u in urls}
    return {urls[0]: inner} if inner is not None and len(urls) == 1 else {}
