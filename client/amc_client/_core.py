"""_Core: what AMCClient and AsyncAMCClient share, every request path of the client (it does no I/O itself).

One core, two thin faces. :class:`_Core` holds everything a request does: options, validation, packing,
canary routing, retries with backoff inside one deadline, the translation of errors, the result checks. Its
request paths are generators that *yield* what they need done (:class:`_Call`: one call of tritonclient's
API; :class:`_Sleep`: a backoff; :class:`_Detach`: a path to run apart, as the routing refresh) and are sent the
result, or thrown the tritonclient exception. One loop runs them, ``_calls.drive``, handing each op to the face's
``_perform``: the blocking :class:`AMCClient` (``_client.py``) performs it with plain calls and ``time.sleep``
(``_calls.run_blocking``), the asyncio :class:`AsyncAMCClient` (``_async_client.py``) with awaited calls and
``asyncio.sleep``; each face adds only how it talks to the channel and its public methods, one line each.

Why one module: it is one class, whose request paths share its routing cache, retry state and deadlines; the rules
they follow (packing, the fleet's choice, routing, search, error translation) are modules of their own already.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from amc_contract import signatures as sig
from amc_contract.routing import Routing

from . import _calls, _fleet, _packing, _routing, _search
from ._calls import Call as _Call
from ._calls import Detach as _Detach
from ._calls import Sleep as _Sleep
from ._calls import Steps as _Steps
from ._fleet import ReplicaStatus
from ._packing import CandidateSet
from ._types import RankedResult
from .errors import AMCError, DeadlineExceededError, InvalidInputError, ModelVersionError

# The deadline of a routing refresh in the background (close() waits for one in flight).
REFRESH_TIMEOUT_S = 2.0
# gRPC's largest message (2 GiB - 1), as tritonclient's own default: 1000 candidates x 49 x 1280 float32 is 250 MB.
MAX_MESSAGE_BYTES = 2**31 - 1


def _channel_args() -> list[tuple[str, Any]]:
    ka = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", ka.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", ka.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
    ]


class _Core:
    """What the sync and async clients share: options, request preparation, the request paths, routing cache,
    retries, error translation and result checks (``_packing.results``). See the module docstring."""

    def __init__(
        self,
        url: str | Sequence[str] = "127.0.0.1:8001",
        *,
        timeout_s: float = 10.0,
        model_version: int | None = None,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        retries: int = 3,
        backoff_s: float = _calls.DEFAULT_BACKOFF_S,
        routing_refresh_s: float = 1.0,
        headers: Mapping[str, str] | None = None,
        server_deadline_s: float = 300.0,
        _inner: Any = None,
    ) -> None:
        if not timeout_s > 0:
            raise InvalidInputError(f"timeout_s must be > 0, got {timeout_s}")
        if model_version is not None and (
            not isinstance(model_version, int) or isinstance(model_version, bool) or model_version < 0
        ):
            raise InvalidInputError(
                f"model_version must be a non-negative int or None, got {model_version!r}"
            )
        if retries < 0 or backoff_s < 0 or routing_refresh_s < 0:
            raise InvalidInputError("retries, backoff_s and routing_refresh_s must be >= 0")
        # One URL, or a fleet of replicas (``_fleet``: least outstanding requests, ejection, probes).
        self._fleet = _fleet.Fleet(_fleet.replica_urls(url))
        self.url = url if isinstance(url, str) and len(self._fleet) == 1 else self._fleet.url
        self.urls = [r.url for r in self._fleet.replicas]
        self.timeout_s = float(timeout_s)
        self.model_version = model_version
        self._retries = retries
        self._backoff_s = backoff_s
        self._routing_refresh_s = routing_refresh_s
        self._headers = dict(headers) if headers else None
        self._rng = random.Random()
        self.server_deadline_s = float(server_deadline_s)
        # tritonclient's channel options; each face opens its channel with them (``_open``).
        self._channel = dict(
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            channel_args=_channel_args() + (_fleet.RECONNECT_ARGS if len(self._fleet) > 1 else []),
        )
        for replica in self._fleet.replicas:
            replica.client = _fleet.clients_by_url(_inner, self.urls).get(replica.url)
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._pending_tasks: set[Any] = set()
        self._routing: Routing | None = None
        self._routing_at = -math.inf
        self._refreshing = False  # a routing refresh runs apart (_routing_in_hand)
        self._closing = False  # close() began: no refresh starts any more
        self._next_refresh_at = -math.inf  # after a failed refresh: not before then
        self._open()

    def _open(self) -> None:
        """Open the gRPC channels now (the blocking face) or on first use (the asyncio face)."""

    def replicas(self) -> list[ReplicaStatus]:
        """Each replica as this client sees it: in rotation or not, calls in flight, sent, failed (no I/O)."""
        return self._fleet.status()

    def _client_of(self, replica: _fleet.Replica) -> Any:
        """The tritonclient client of ``replica`` (each face opens its own kind)."""
        raise NotImplementedError

    @property
    def _inner(self) -> Any:
        """The first replica's client (the only one when the client has one URL)."""
        return self._client_of(self._fleet.replicas[0])

    # ---- request preparation and errors (no I/O) ---------------------------------------------------------
    def _prepare(
        self,
        queries: Sequence[str],
        candidate_sets: Sequence[CandidateSet],
        top_k: int | None,
        validate: bool,
    ) -> tuple[list[str], list[_packing._Set]]:
        if isinstance(queries, str) or len(queries) != len(candidate_sets):
            raise InvalidInputError(
                "rank_many takes a list of queries and a list of candidate sets of the same length"
            )
        _packing.check_top_k(top_k)
        qs = [_packing.check_query(q) for q in queries]
        sets = [_packing.normalize(c) for c in candidate_sets]
        if validate:
            _packing.check_top_k(top_k, [len(s) for s in sets])
            for q, s in zip(qs, sets, strict=True):
                _packing.check_request(q, s)
        return qs, sets

    @staticmethod
    def _inputs(arrays: Mapping[str, np.ndarray], signature: sig.StepSignature = sig.ENSEMBLE
                ) -> list[grpcclient.InferInput]:
        inputs = []
        for spec in signature.inputs:
            if spec.optional and spec.name not in arrays:
                continue
            array = arrays[spec.name]
            tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.triton_datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    @staticmethod
    def _outputs(signature: sig.StepSignature = sig.ENSEMBLE) -> list[grpcclient.InferRequestedOutput]:
        return [grpcclient.InferRequestedOutput(name) for name in signature.output_names]

    def _set_routing(self, config: Mapping[str, Any], asked: float) -> Routing:
        """Routing from ``amc``'s config, as read at ``asked`` (time.monotonic() when the read was sent)."""
        self._routing, self._routing_at = _routing.parse(config), asked
        return self._routing

    def _retry_delay(
        self, e: InferenceServerException, attempt: int, deadline: _calls.Deadline, replica: _fleet.Replica
    ) -> float | None:
        """Seconds to wait before retrying ``e`` (0: at once, on another replica), or None to give up."""
        fleet = len(self._fleet) > 1
        if attempt >= self._retries + len(self._fleet) - 1 or not (
            _fleet.retry_elsewhere(e) if fleet else _calls.retryable(e)
        ):
            return None
        if fleet and attempt < len(self._fleet) - 1 and self._fleet.healthy_besides(replica):
            return 0.0  # one round over the fleet at once, then backoff (every replica may be overloaded)
        delay = _calls.backoff(self._backoff_s, attempt, self._rng)
        return delay if delay < deadline.remaining() else None

    def _error(self, e: InferenceServerException, model: str, url: str | None = None) -> AMCError:
        return _calls.translate(e, url=url or self.url, model=model, timeout_s=self.timeout_s)

    def _out_of_time(self, model: str) -> DeadlineExceededError:
        return DeadlineExceededError(f"no answer from {model!r} at {self.url} within {self.timeout_s:g} s")

    def _not_loaded(self, e: ModelVersionError, loaded: list[int] | None) -> ModelVersionError:
        if loaded is None or e.version is None:
            return e
        listed = ", ".join(map(str, loaded)) or "none"
        return ModelVersionError(
            f"model version {e.version} is not loaded on the server at {self.url}; loaded versions: {listed}",
            version=e.version,
            loaded=loaded,
        )

    # ---- the request paths: generators of _Call / _Sleep / _Detach, run by _calls.drive ----------------------
    def _rank_many(
        self,
        queries: Sequence[str],
        candidate_sets: Sequence[CandidateSet],
        top_k: int | None,
        validate: bool,
    ) -> _Steps:
        qs, sets = self._prepare(queries, candidate_sets, top_k, validate)
        ranked: list[list[RankedResult]] = []
        for group in _packing.groups(sets):
            ranked += yield from self._request([qs[i] for i in group], [sets[i] for i in group], top_k)
        return ranked

    def _request(self, queries: list[str], sets: list[_packing._Set], top_k: int | None) -> _Steps:
        deadline = _calls.Deadline(self.timeout_s)
        inputs, outputs = self._inputs(_packing.pack(queries, sets, top_k)), self._outputs()
        for reread in (False, True):
            model, expected = yield from self._choose(deadline, reread)
            try:
                result = yield from self._call(
                    "infer", model, deadline, model_name=model, inputs=inputs, outputs=outputs
                )
                return _packing.results(result, model, expected, sets, top_k)
            except ModelVersionError as e:
                if not reread and self.model_version is None and expected is not None:
                    continue  # the canary went away since routing was read: read it again
                loaded = yield from self._loaded_or_none(deadline)
                raise self._not_loaded(e, loaded) from e.__cause__
        raise AssertionError("unreachable")

    def _search(self, query: str, top_k: int | None, ids: Any, validate: bool) -> _Steps:
        """Whole-store search (``_search.py`` has the design): one request to ``amc_search`` (or its pinned twin)."""
        text, rows = _search.check_search(query, top_k, ids, validate)
        return (yield from self._search_request([text], top_k, rows))[0]

    def _search_many(self, queries: Sequence[str], top_k: int | None, ids: Any, validate: bool) -> _Steps:
        """Several searches in requests of up to ``sig.SEARCH_MAX_BATCH`` queries each, one after the other."""
        texts, rows = _search.check_search_many(queries, top_k, ids, validate)
        found: list[list[RankedResult]] = []
        for start in range(0, len(texts), sig.SEARCH_MAX_BATCH):
            part = texts[start:start + sig.SEARCH_MAX_BATCH]
            try:
                found += yield from self._search_request(part, top_k, rows)
            except InvalidInputError as e:  # the server names a query by its place in the request
                if len(part) == len(texts):
                    raise
                raise InvalidInputError(f"the request of queries[{start}:{start + len(part)}]: {e}") from e
        return found

    def _search_request(self, texts: list[str], top_k: int | None, rows: np.ndarray | None) -> _Steps:
        inputs = self._inputs(_search.pack_search(texts, top_k, rows), sig.SEARCH_ENSEMBLE)
        deadline = _calls.Deadline(self.timeout_s)
        model, version = yield from self._choose_search(deadline)
        result = yield from self._call("infer", model, deadline, model_name=model, inputs=inputs,
                                       outputs=self._outputs(sig.SEARCH_ENSEMBLE))
        return _search.results(result, model, version, len(texts))

    def _choose_search(self, deadline: _calls.Deadline) -> _Steps:
        """``amc_search``, its pinned twin, or (its canary share of the searches) the canary version's."""
        if self.model_version is not None:
            return sig.versioned_search_ensemble_name(self.model_version), self.model_version
        try:
            yield from self._routing_in_hand(deadline)
        except ModelVersionError:  # a server that serves search without amc: no canary to follow
            return sig.SEARCH_ENSEMBLE_NAME, None
        return _routing.pick_search(self._routing, self._rng)

    def _choose(self, deadline: _calls.Deadline, reread: bool) -> _Steps:
        if self.model_version is not None:
            return sig.versioned_ensemble_name(self.model_version), self.model_version
        if reread:
            yield from self._fetch_routing(deadline)
        else:
            yield from self._routing_in_hand(deadline)
        assert self._routing is not None
        return _routing.pick(self._routing, self._rng)

    def _routing_in_hand(self, deadline: _calls.Deadline) -> _Steps:
        """Make sure the routing in hand is at most ``routing_refresh_s`` old, refreshing it ahead of time.

        Older than that (or none yet): read it before the request, so that a rollback reaches every request
        within ``routing_refresh_s``. Older than half of it: go by it and start one refresh apart
        (:class:`_Detach`), unless one runs already or the client is closing, so that a client sending steadily
        finds it fresh and does not wait for the read (under overload the read waits at the server's front end
        like any request)."""
        now = time.monotonic()
        if self._routing is None or now - self._routing_at >= self._routing_refresh_s:
            yield from self._fetch_routing(deadline)
            return
        if now - self._routing_at < self._routing_refresh_s / 2 or now < self._next_refresh_at:
            return
        with self._pending_lock:
            if self._refreshing or self._closing:
                return
            self._refreshing = True
        yield _Detach(self._refresh_routing(), done=self._refresh_ended)

    def _refresh_routing(self) -> _Steps:
        # A short deadline: close() waits for a refresh in flight (closing the channel would cancel it).
        try:
            yield from self._fetch_routing(_calls.Deadline(min(self.timeout_s, REFRESH_TIMEOUT_S)))
        except AMCError:  # the routing in hand stays; no new try apart for a quarter of a refresh period
            self._next_refresh_at = time.monotonic() + self._routing_refresh_s / 4

    def _refresh_ended(self) -> None:
        """Called by the face when a detached refresh ends, however it ends (even if it never started)."""
        self._refreshing = False

    def _fetch_routing(self, deadline: _calls.Deadline) -> _Steps:
        name, asked = sig.ENSEMBLE_NAME, time.monotonic()
        config = yield from self._call("get_model_config", name, deadline, model_name=name, as_json=True)
        if asked >= self._routing_at:  # a slower, older read (a refresh behind a re-read) does not undo a newer one
            self._set_routing(config, asked)
        return self._routing

    def _call(self, method: str, model: str, deadline: _calls.Deadline, **kwargs: Any) -> _Steps:
        """One call with retries (UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL, UNKNOWN) and backoff, all within
        ``deadline``; a failure that is not retried, or the last one, is raised translated (``_calls``). In a
        fleet each attempt goes to the replica ``_fleet`` picks, and a retry to another one, at once."""
        attempt, replica = 0, None
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise self._out_of_time(model)
            replica = yield from self._fleet.choose(deadline, avoid=replica)
            try:
                timeout = self._fleet.attempt_s(deadline.remaining(), replica)
                with self._fleet.sending(replica, inference=method == "infer"):
                    return (yield _Call(method, timeout, kwargs, replica))
            except InferenceServerException as e:
                self._fleet.failed(replica, e)
                delay = self._retry_delay(e, attempt, deadline, replica)
                if delay is None:
                    raise self._error(e, model, replica.url) from e
            if delay > 0:
                yield _Sleep(delay)
            attempt += 1

    def _loaded_or_none(self, deadline: _calls.Deadline) -> _Steps:
        try:
            index = yield from self._call("get_model_repository_index", "repository index", deadline, as_json=True)
        except AMCError:
            return None
        return _routing.loaded_versions(index)

    def _model_versions(self) -> _Steps:
        deadline = _calls.Deadline(self.timeout_s)
        index = yield from self._call("get_model_repository_index", "repository index", deadline, as_json=True)
        return _routing.loaded_versions(index)

    def _routing_now(self) -> _Steps:
        return (yield from self._fetch_routing(_calls.Deadline(self.timeout_s)))

    def _probe(self, method: str, *args: Any) -> _Steps:
        """A health call (``is_server_ready``, ``is_model_ready``): its answer, False if unreachable. A fleet
        asks its replicas in turn and answers True if one does."""
        for replica in self._fleet.replicas:
            try:
                if (yield _Call(method, self.timeout_s, {"args": args}, replica)):
                    return True
            except InferenceServerException:
                pass
        return False

    def _ready(self, version: int | None) -> _Steps:
        name = sig.ENSEMBLE_NAME if version is None else sig.versioned_ensemble_name(version)
        return (yield from self._probe("is_model_ready", name))

    # ---- running a path (the faces' part) ------------------------------------------------------------------
    def _invoke(self, call: _Call) -> Any:
        """Make ``call`` on its replica's tritonclient client: what the method returns (the blocking face's answer;
        the asyncio face's awaitable of it). An inference goes through the face's ``_infer``."""
        inner = self._client_of(call.replica)
        if call.method == "infer":
            return self._infer(inner, call.remaining, **call.kwargs)
        kwargs = dict(call.kwargs)
        args = kwargs.pop("args", ())
        return getattr(inner, call.method)(*args, **kwargs, headers=self._headers, client_timeout=call.remaining)

    def _infer(self, inner: Any, remaining: float, **kwargs: Any) -> Any:
        """One inference on ``inner``, waited for at most ``remaining`` s and never cancelled (each face's own)."""
        raise NotImplementedError
