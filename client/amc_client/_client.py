"""AMCClient, the blocking client: it runs the core's request paths (``_core.py``) with plain calls and
``time.sleep``, in threads where a path runs apart, and adds the public methods, one line each.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from amc_contract.routing import Routing

from . import _calls, _fleet
from ._calls import Call as _Call
from ._calls import Detach as _Detach
from ._calls import Sleep as _Sleep
from ._calls import Steps as _Steps
from ._core import _Core
from ._packing import CandidateSet
from ._types import RankedResult


class AMCClient(_Core):
    """Blocking client of the AMC ranker. One gRPC channel, reused; use it as a context manager or ``close()`` it.

    ``url``: one ``host:port``; or a fleet of replicas, as a list of them, a comma-separated string or
    ``dns:///host:port`` (every address the name resolves to): one channel per replica, each call to the healthy
    replica with the fewest calls in flight, a failing one taken out and probed back in, a failed call retried
    at once on another replica within ``timeout_s`` (``_fleet`` has the rules; ``replicas()`` the state).

    ``timeout_s`` is the deadline of one request to the server, retries and the routing lookup included.
    ``model_version`` pins every query to ``amc_v{N}``; None follows the server's canary routing (re-read at most
    every ``routing_refresh_s``). Server faults (UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL, UNKNOWN) are retried
    ``retries`` times with exponential backoff from ``backoff_s`` (jitter, at most 2 s apart); the caller's
    mistakes never are (in a fleet: ``retries`` plus one attempt per other replica, the first round at once).
    ``ssl``/``root_certificates``/``private_key``/``certificate_chain`` (file paths) as in tritonclient:
    ``ssl=True`` with ``root_certificates`` (the CA that signed the server's certificate) for TLS, plus
    ``private_key`` and ``certificate_chain`` for mutual TLS. ``headers`` are sent with every call.
    """

    def _open(self) -> None:
        for replica in self._fleet.replicas:
            if replica.client is None:
                replica.client = grpcclient.InferenceServerClient(replica.url, **self._channel)

    def _client_of(self, replica: _fleet.Replica) -> Any:
        return replica.client

    def _drive(self, steps: _Steps) -> Any:
        """Run a core request path (``_calls.drive``): each call it yields made blocking, each backoff slept."""
        return _calls.run_blocking(_calls.drive(steps, self._perform))

    async def _perform(self, op: _Call | _Sleep | _Detach) -> Any:
        """One op of a path, done before it returns: it never suspends (``_calls.run_blocking``)."""
        if isinstance(op, _Sleep):
            time.sleep(op.seconds)
        elif isinstance(op, _Detach):
            self._start_apart(op)
        else:
            return self._invoke(op)
        return None

    def _start_apart(self, op: _Detach) -> None:
        """Run ``op``'s path in a daemon thread; close() waits for it as for an abandoned call."""
        with self._pending_lock:
            self._pending += 1
        try:
            threading.Thread(target=self._drive_apart, args=(op,), daemon=True, name="amc-client-detached").start()
        except RuntimeError:  # no thread to be had: the path does not run
            self._end_apart(op)

    def _drive_apart(self, op: _Detach) -> None:
        """Run a detached path to its end; nobody waits for it, so nothing it raises goes anywhere."""
        try:
            self._drive(op.steps)
        except Exception:  # noqa: BLE001, S110 - e.g. a channel closed meanwhile: the routing in hand stays
            pass
        finally:
            self._end_apart(op)

    def _end_apart(self, op: _Detach) -> None:
        try:
            op.steps.close()
        finally:
            op.done()
            with self._pending_lock:
                self._pending -= 1

    def _infer(self, inner: Any, remaining: float, **kwargs: Any) -> Any:
        """One inference that the caller stops waiting for after ``remaining`` s but never cancels.

        tritonserver 2.51's gRPC frontend can crash when a cancellation (an expired gRPC deadline, a closed
        channel) races with the response (triton-inference-server/server#7840, #8034; fixed in later
        releases). So the deadline the caller asked for is enforced here, and the RPC itself carries only the
        long ``server_deadline_s`` backstop; an abandoned call finishes on the server and is dropped.
        """
        if not hasattr(inner, "async_infer"):  # test doubles without the callback API
            return inner.infer(**kwargs, headers=self._headers, client_timeout=remaining)
        done, box = threading.Event(), {}

        def finished(result: Any, error: Any) -> None:
            box["result"], box["error"] = result, error
            with self._pending_lock:
                self._pending -= 1
            done.set()

        with self._pending_lock:
            self._pending += 1
        try:
            inner.async_infer(callback=finished, headers=self._headers,
                                    client_timeout=self.server_deadline_s, **kwargs)
        except BaseException:  # the call never started: it will not call back
            with self._pending_lock:
                self._pending -= 1
            raise
        if not done.wait(remaining):
            raise InferenceServerException(msg="deadline exceeded (request left to finish on the server)",
                                           status="StatusCode.DEADLINE_EXCEEDED")
        if box["error"] is not None:
            raise box["error"]
        return box["result"]

    def __enter__(self) -> AMCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the gRPC channels, after abandoned calls have finished (closing would cancel them)."""
        self._closing = True
        end = time.monotonic() + self.server_deadline_s
        while self._pending > 0 and time.monotonic() < end:
            time.sleep(0.01)
        for replica in self._fleet.replicas:
            replica.client.close()

    def rank(
        self, query: str, candidates: CandidateSet, top_k: int | None = None, *, validate: bool = True
    ) -> list[RankedResult]:
        """Rank one query's candidates, best first (``top_k`` of them, or all)."""
        return self.rank_many([query], [candidates], top_k, validate=validate)[0]

    def rank_many(
        self,
        queries: Sequence[str],
        candidate_sets: Sequence[CandidateSet],
        top_k: int | None = None,
        *,
        validate: bool = True,
    ) -> list[list[RankedResult]]:
        """Rank several queries, each with its own candidates; one request per group of up to MAX_BATCH queries.

        ``validate=False`` skips the client-side checks (empty query or set, bounds) and lets the server
        reject them.
        """
        return self._drive(self._rank_many(queries, candidate_sets, top_k, validate))

    def search(
        self, query: str, top_k: int | None = 10, ids: Sequence[int] | None = None, *, validate: bool = True
    ) -> list[RankedResult]:
        """The ``top_k`` best images of the server's candidate store for ``query`` (all rows if None), best first,
        each with its explanation; ``ids``: search only these store rows (``RankedResult.store_row``). Needs a
        model version published with a store (``export.publish --store-corpus``); one request, whatever its size."""
        return self._drive(self._search(query, top_k, ids, validate))

    def search_many(
        self, queries: Sequence[str], top_k: int | None = 10, ids: Sequence[int] | None = None, *,
        validate: bool = True
    ) -> list[list[RankedResult]]:
        """:meth:`search` for each of ``queries`` (sharing ``top_k`` and ``ids``), in requests of up to
        ``signatures.SEARCH_MAX_BATCH`` queries: a caller with a queue of queries pays each request's cost once per
        request, not per query. One bad query fails the call, its index in the message; the server keeps serving."""
        return self._drive(self._search_many(queries, top_k, ids, validate))

    def server_ready(self) -> bool:
        """True if the server answers that it is ready; False if it is not, or cannot be reached."""
        return self._drive(self._probe("is_server_ready"))

    def model_ready(self, version: int | None = None) -> bool:
        """True if ``amc`` (or ``amc_v{version}``) is loaded and ready; False otherwise or if unreachable."""
        return self._drive(self._ready(version))

    def model_versions(self) -> list[int]:
        """The model versions whose ``amc_v{N}`` ensemble is loaded and ready, ascending."""
        return self._drive(self._model_versions())

    def routing(self) -> Routing:
        """The server's current canary routing (read now, and cached for ``rank``)."""
        return self._drive(self._routing_now())
