"""AMCClient and AsyncAMCClient: rank candidates with the `amc` ensemble over Triton's gRPC API."""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from . import _calls, _packing, _routing
from . import signatures as sig
from ._packing import CandidateSet
from ._types import RankedResult, Routing
from .errors import AMCError, DeadlineExceededError, InvalidInputError, MixedVersionError, ModelVersionError

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


class _Base:
    """What the sync and async clients share: options, request preparation, routing cache, result checks."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        model_version: int | None,
        retries: int,
        backoff_s: float,
        routing_refresh_s: float,
        headers: Mapping[str, str] | None,
        server_deadline_s: float = 300.0,
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
        self.url = url
        self.timeout_s = float(timeout_s)
        self.model_version = model_version
        self._retries = retries
        self._backoff_s = backoff_s
        self._routing_refresh_s = routing_refresh_s
        self._headers = dict(headers) if headers else None
        self._rng = random.Random()
        self.server_deadline_s = float(server_deadline_s)
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._pending_tasks: set[Any] = set()
        self._routing: Routing | None = None
        self._routing_at = -math.inf

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
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise InvalidInputError(f"top_k must be a positive int or None, got {top_k!r}")
        qs = [_packing.check_query(q) for q in queries]
        sets = [_packing.normalize(c) for c in candidate_sets]
        if validate:
            for q, s in zip(qs, sets, strict=True):
                _packing.check_request(q, s)
        return qs, sets

    @staticmethod
    def _inputs(arrays: Mapping[str, np.ndarray]) -> list[grpcclient.InferInput]:
        inputs = []
        for spec in sig.ENSEMBLE.inputs:
            array = arrays[spec.name]
            tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.triton_datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    @staticmethod
    def _outputs() -> list[grpcclient.InferRequestedOutput]:
        return [grpcclient.InferRequestedOutput(name) for name in sig.ENSEMBLE.output_names]

    def _routing_fresh(self) -> bool:
        return self._routing is not None and time.monotonic() - self._routing_at < self._routing_refresh_s

    def _set_routing(self, config: Mapping[str, Any]) -> Routing:
        self._routing, self._routing_at = _routing.parse(config), time.monotonic()
        return self._routing

    def _retry_delay(
        self, e: InferenceServerException, attempt: int, deadline: _calls.Deadline
    ) -> float | None:
        """Seconds to wait before retrying ``e``, or None to give up."""
        if attempt >= self._retries or not _calls.retryable(e):
            return None
        delay = _calls.backoff(self._backoff_s, attempt, self._rng)
        return delay if delay < deadline.remaining() else None

    def _error(self, e: InferenceServerException, model: str) -> AMCError:
        return _calls.translate(e, url=self.url, model=model, timeout_s=self.timeout_s)

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

    @staticmethod
    def _results(
        result: Any, model: str, expected: int | None, sets: Sequence[_packing._Set], top_k: int | None
    ) -> list[list[RankedResult]]:
        outputs = {name: result.as_numpy(name) for name in sig.ENSEMBLE.output_names}
        missing = [name for name, value in outputs.items() if value is None]
        if missing:
            raise AMCError(f"{model!r} answered without the outputs {missing}")
        versions = outputs[sig.MODEL_VERSION.name].reshape(-1)[: len(sets)]
        if (versions == -1).any():
            raise MixedVersionError(
                f"{model!r} answered with a mixed-version response (model_version -1: its steps "
                "ran different model versions, as during a rollout); retry the request"
            )
        if expected is not None and (versions != expected).any():
            raise MixedVersionError(
                f"{model!r} should answer with model version {expected}, "
                f"but version {int(versions[versions != expected][0])} answered"
            )
        return _packing.unpack(outputs, sets, versions.tolist(), top_k)


class AMCClient(_Base):
    """Blocking client of the AMC ranker. One gRPC channel, reused; use it as a context manager or ``close()`` it.

    ``timeout_s`` is the deadline of one request to the server, retries and the routing lookup included.
    ``model_version`` pins every query to ``amc_v{N}``; None follows the server's canary routing (re-read at most
    every ``routing_refresh_s``). Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried (``retries`` times,
    exponential backoff from ``backoff_s`` with jitter). ``ssl``/``root_certificates``/``private_key``/
    ``certificate_chain`` (file paths) as in tritonclient; ``headers`` are sent with every call.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        *,
        timeout_s: float = 10.0,
        model_version: int | None = None,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        retries: int = 3,
        backoff_s: float = 0.1,
        routing_refresh_s: float = 1.0,
        headers: Mapping[str, str] | None = None,
        server_deadline_s: float = 300.0,
        _inner: Any = None,
    ) -> None:
        super().__init__(
            url,
            timeout_s=timeout_s,
            model_version=model_version,
            retries=retries,
            backoff_s=backoff_s,
            routing_refresh_s=routing_refresh_s,
            headers=headers,
            server_deadline_s=server_deadline_s,
        )
        self._inner = (
            _inner
            if _inner is not None
            else grpcclient.InferenceServerClient(
                url,
                ssl=ssl,
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
                channel_args=_channel_args(),
            )
        )

    def __enter__(self) -> AMCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the gRPC channel, after abandoned calls have finished (closing would cancel them)."""
        end = time.monotonic() + self.server_deadline_s
        while self._pending > 0 and time.monotonic() < end:
            time.sleep(0.01)
        self._inner.close()

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

        ``validate=False`` skips the client-side checks (empty query or set, too many candidates) and lets the
        server reject them.
        """
        qs, sets = self._prepare(queries, candidate_sets, top_k, validate)
        ranked: list[list[RankedResult]] = []
        for group in _packing.groups(sets):
            ranked += self._request([qs[i] for i in group], [sets[i] for i in group], top_k)
        return ranked

    def _request(
        self, queries: list[str], sets: list[_packing._Set], top_k: int | None
    ) -> list[list[RankedResult]]:
        deadline = _calls.Deadline(self.timeout_s)
        inputs, outputs = self._inputs(_packing.pack(queries, sets)), self._outputs()
        for reread in (False, True):
            model, expected = self._choose(deadline, reread)
            try:
                result = self._call(
                    "infer", model, deadline, model_name=model, inputs=inputs, outputs=outputs
                )
                return self._results(result, model, expected, sets, top_k)
            except ModelVersionError as e:
                if not reread and self.model_version is None and expected is not None:
                    continue  # the canary went away since routing was read: read it again
                raise self._not_loaded(e, self._loaded_or_none(deadline)) from e.__cause__
        raise AssertionError("unreachable")

    def _choose(self, deadline: _calls.Deadline, reread: bool) -> tuple[str, int | None]:
        if self.model_version is not None:
            return sig.versioned_ensemble_name(self.model_version), self.model_version
        if reread or not self._routing_fresh():
            self._fetch_routing(deadline)
        assert self._routing is not None
        return _routing.pick(self._routing, self._rng)

    def _fetch_routing(self, deadline: _calls.Deadline) -> Routing:
        name = sig.ENSEMBLE_NAME
        return self._set_routing(
            self._call("get_model_config", name, deadline, model_name=name, as_json=True)
        )

    def _call(self, method: str, model: str, deadline: _calls.Deadline, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise self._out_of_time(model)
            try:
                if method == "infer":
                    return self._infer(remaining, **kwargs)
                return getattr(self._inner, method)(**kwargs, headers=self._headers, client_timeout=remaining)
            except InferenceServerException as e:
                delay = self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise self._error(e, model) from e
            time.sleep(delay)
            attempt += 1

    def _infer(self, remaining: float, **kwargs: Any) -> Any:
        """One inference that the caller stops waiting for after ``remaining`` s but never cancels.

        tritonserver 2.51's gRPC frontend can crash when a cancellation (an expired gRPC deadline, a closed
        channel) races with the response (triton-inference-server/server#7840, #8034; fixed in later
        releases). So the deadline the caller asked for is enforced here, and the RPC itself carries only the
        long ``server_deadline_s`` backstop; an abandoned call finishes on the server and is dropped.
        """
        if not hasattr(self._inner, "async_infer"):  # test doubles without the callback API
            return self._inner.infer(**kwargs, headers=self._headers, client_timeout=remaining)
        done, box = threading.Event(), {}

        def finished(result: Any, error: Any) -> None:
            box["result"], box["error"] = result, error
            with self._pending_lock:
                self._pending -= 1
            done.set()

        with self._pending_lock:
            self._pending += 1
        try:
            self._inner.async_infer(callback=finished, headers=self._headers,
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

    def _loaded_or_none(self, deadline: _calls.Deadline) -> list[int] | None:
        try:
            index = self._call("get_model_repository_index", "repository index", deadline, as_json=True)
        except AMCError:
            return None
        return _routing.loaded_versions(index)

    def server_ready(self) -> bool:
        """True if the server answers that it is ready; False if it is not, or cannot be reached."""
        try:
            return bool(self._inner.is_server_ready(headers=self._headers, client_timeout=self.timeout_s))
        except InferenceServerException:
            return False

    def model_ready(self, version: int | None = None) -> bool:
        """True if ``amc`` (or ``amc_v{version}``) is loaded and ready; False otherwise or if unreachable."""
        name = sig.ENSEMBLE_NAME if version is None else sig.versioned_ensemble_name(version)
        try:
            return bool(
                self._inner.is_model_ready(name, headers=self._headers, client_timeout=self.timeout_s)
            )
        except InferenceServerException:
            return False

    def model_versions(self) -> list[int]:
        """The model versions whose ``amc_v{N}`` ensemble is loaded and ready, ascending."""
        index = self._call(
            "get_model_repository_index", "repository index", _calls.Deadline(self.timeout_s), as_json=True
        )
        return _routing.loaded_versions(index)

    def routing(self) -> Routing:
        """The server's current canary routing (read now, and cached for ``rank``)."""
        return self._fetch_routing(_calls.Deadline(self.timeout_s))


class AsyncAMCClient(_Base):
    """The asyncio twin of :class:`AMCClient` (same options and methods, awaited), on ``tritonclient.grpc.aio``.

    The channel is opened on first use, inside the running event loop; use ``async with`` or ``await close()``.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        *,
        timeout_s: float = 10.0,
        model_version: int | None = None,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        retries: int = 3,
        backoff_s: float = 0.1,
        routing_refresh_s: float = 1.0,
        headers: Mapping[str, str] | None = None,
        server_deadline_s: float = 300.0,
        _inner: Any = None,
    ) -> None:
        super().__init__(
            url,
            timeout_s=timeout_s,
            model_version=model_version,
            retries=retries,
            backoff_s=backoff_s,
            routing_refresh_s=routing_refresh_s,
            headers=headers,
            server_deadline_s=server_deadline_s,
        )
        self._tls = dict(
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
        self._inner_client = _inner

    @property
    def _inner(self) -> Any:
        if self._inner_client is None:
            import tritonclient.grpc.aio as aio

            self._inner_client = aio.InferenceServerClient(
                self.url, **self._tls, channel_args=_channel_args()
            )
        return self._inner_client

    async def __aenter__(self) -> AsyncAMCClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _infer(self, remaining: float, **kwargs: Any) -> Any:
        """See :meth:`AMCClient._infer`: wait at most ``remaining`` s, but never cancel the RPC itself."""
        task = asyncio.ensure_future(
            self._inner.infer(**kwargs, headers=self._headers, client_timeout=self.server_deadline_s))
        self._pending_tasks.add(task)
        task.add_done_callback(self._pending_tasks.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(task), remaining)
        except TimeoutError:
            raise InferenceServerException(msg="deadline exceeded (request left to finish on the server)",
                                           status="StatusCode.DEADLINE_EXCEEDED") from None

    async def close(self) -> None:
        """Close the gRPC channel (if one was opened), after abandoned calls have finished."""
        if self._pending_tasks:
            await asyncio.wait(set(self._pending_tasks), timeout=self.server_deadline_s)
        if self._inner_client is not None:
            await self._inner_client.close()
            self._inner_client = None

    async def rank(
        self, query: str, candidates: CandidateSet, top_k: int | None = None, *, validate: bool = True
    ) -> list[RankedResult]:
        """See :meth:`AMCClient.rank`."""
        return (await self.rank_many([query], [candidates], top_k, validate=validate))[0]

    async def rank_many(
        self,
        queries: Sequence[str],
        candidate_sets: Sequence[CandidateSet],
        top_k: int | None = None,
        *,
        validate: bool = True,
    ) -> list[list[RankedResult]]:
        """See :meth:`AMCClient.rank_many`."""
        qs, sets = self._prepare(queries, candidate_sets, top_k, validate)
        ranked: list[list[RankedResult]] = []
        for group in _packing.groups(sets):
            ranked += await self._request([qs[i] for i in group], [sets[i] for i in group], top_k)
        return ranked

    async def _request(
        self, queries: list[str], sets: list[_packing._Set], top_k: int | None
    ) -> list[list[RankedResult]]:
        deadline = _calls.Deadline(self.timeout_s)
        inputs, outputs = self._inputs(_packing.pack(queries, sets)), self._outputs()
        for reread in (False, True):
            model, expected = await self._choose(deadline, reread)
            try:
                result = await self._call(
                    "infer", model, deadline, model_name=model, inputs=inputs, outputs=outputs
                )
                return self._results(result, model, expected, sets, top_k)
            except ModelVersionError as e:
                if not reread and self.model_version is None and expected is not None:
                    continue
                raise self._not_loaded(e, await self._loaded_or_none(deadline)) from e.__cause__
        raise AssertionError("unreachable")

    async def _choose(self, deadline: _calls.Deadline, reread: bool) -> tuple[str, int | None]:
        if self.model_version is not None:
            return sig.versioned_ensemble_name(self.model_version), self.model_version
        if reread or not self._routing_fresh():
            await self._fetch_routing(deadline)
        assert self._routing is not None
        return _routing.pick(self._routing, self._rng)

    async def _fetch_routing(self, deadline: _calls.Deadline) -> Routing:
        name = sig.ENSEMBLE_NAME
        return self._set_routing(
            await self._call("get_model_config", name, deadline, model_name=name, as_json=True)
        )

    async def _call(self, method: str, model: str, deadline: _calls.Deadline, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise self._out_of_time(model)
            try:
                if method == "infer":
                    return await self._infer(remaining, **kwargs)
                return await getattr(self._inner, method)(
                    **kwargs, headers=self._headers, client_timeout=remaining
                )
            except InferenceServerException as e:
                delay = self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise self._error(e, model) from e
            await asyncio.sleep(delay)
            attempt += 1

    async def _loaded_or_none(self, deadline: _calls.Deadline) -> list[int] | None:
        try:
            index = await self._call("get_model_repository_index", "repository index", deadline, as_json=True)
        except AMCError:
            return None
        return _routing.loaded_versions(index)

    async def server_ready(self) -> bool:
        """See :meth:`AMCClient.server_ready`."""
        try:
            return bool(
                await self._inner.is_server_ready(headers=self._headers, client_timeout=self.timeout_s)
            )
        except InferenceServerException:
            return False

    async def model_ready(self, version: int | None = None) -> bool:
        """See :meth:`AMCClient.model_ready`."""
        name = sig.ENSEMBLE_NAME if version is None else sig.versioned_ensemble_name(version)
        try:
            return bool(
                await self._inner.is_model_ready(name, headers=self._headers, client_timeout=self.timeout_s)
            )
        except InferenceServerException:
            return False

    async def model_versions(self) -> list[int]:
        """See :meth:`AMCClient.model_versions`."""
        index = await self._call(
            "get_model_repository_index", "repository index", _calls.Deadline(self.timeout_s), as_json=True
        )
        return _routing.loaded_versions(index)

    async def routing(self) -> Routing:
        """See :meth:`AMCClient.routing`."""
        return await self._fetch_routing(_calls.Deadline(self.timeout_s))
