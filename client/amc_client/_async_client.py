"""AsyncAMCClient, the asyncio twin of AMCClient (``_client.py``) on ``tritonclient.grpc.aio``: the same
request paths (``_core.py``), with awaited calls and ``asyncio.sleep``, in tasks where a path runs apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

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


class AsyncAMCClient(_Core):
    """The asyncio twin of :class:`AMCClient` (same options and methods, awaited), on ``tritonclient.grpc.aio``.

    The channel is opened on first use, inside the running event loop; use ``async with`` or ``await close()``.
    """

    def _client_of(self, replica: _fleet.Replica) -> Any:
        if replica.client is None:
            import tritonclient.grpc.aio as aio

            replica.client = aio.InferenceServerClient(replica.url, **self._channel)
        return replica.client

    async def _drive(self, steps: _Steps) -> Any:
        """Run a core request path (``_calls.drive``): each call it yields awaited, each backoff slept with asyncio."""
        return await _calls.drive(steps, self._perform)

    async def _perform(self, op: _Call | _Sleep | _Detach) -> Any:
        """One op of a path; a detached path runs in a task of its own."""
        if isinstance(op, _Sleep):
            await asyncio.sleep(op.seconds)
        elif isinstance(op, _Detach):
            task = asyncio.ensure_future(self._drive_apart(op.steps))
            self._pending_tasks.add(task)  # close() waits for it; done, it leaves the set
            task.add_done_callback(self._pending_tasks.discard)
            task.add_done_callback(lambda _, done=op.done: done())  # also when cancelled before it ran
        else:
            return await self._invoke(op)
        return None

    async def _drive_apart(self, steps: _Steps) -> None:
        """See :meth:`AMCClient._drive_apart`."""
        try:
            await self._drive(steps)
        except Exception:  # noqa: BLE001, S110
            pass
        finally:
            steps.close()

    async def _infer(self, inner: Any, remaining: float, **kwargs: Any) -> Any:
        """See :meth:`AMCClient._infer`: wait at most ``remaining`` s, but never cancel the RPC itself."""
        task = asyncio.ensure_future(
            inner.infer(**kwargs, headers=self._headers, client_timeout=self.server_deadline_s))
        self._pending_tasks.add(task)
        task.add_done_callback(self._pending_tasks.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(task), remaining)
        except TimeoutError:
            raise InferenceServerException(msg="deadline exceeded (request left to finish on the server)",
                                           status="StatusCode.DEADLINE_EXCEEDED") from None

    async def __aenter__(self) -> AsyncAMCClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the gRPC channels (those opened), after abandoned calls have finished."""
        self._closing = True
        if self._pending_tasks:
            await asyncio.wait(set(self._pending_tasks), timeout=self.server_deadline_s)
        for replica in self._fleet.replicas:
            if replica.client is not None:
                await replica.client.close()
                replica.client = None

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
        return await self._drive(self._rank_many(queries, candidate_sets, top_k, validate))

    async def search(
        self, query: str, top_k: int | None = 10, ids: Sequence[int] | None = None, *, validate: bool = True
    ) -> list[RankedResult]:
        """See :meth:`AMCClient.search`."""
        return await self._drive(self._search(query, top_k, ids, validate))

    async def search_many(
        self, queries: Sequence[str], top_k: int | None = 10, ids: Sequence[int] | None = None, *,
        validate: bool = True
    ) -> list[list[RankedResult]]:
        """See :meth:`AMCClient.search_many`."""
        return await self._drive(self._search_many(queries, top_k, ids, validate))

    async def server_ready(self) -> bool:
        """See :meth:`AMCClient.server_ready`."""
        return await self._drive(self._probe("is_server_ready"))

    async def model_ready(self, version: int | None = None) -> bool:
        """See :meth:`AMCClient.model_ready`."""
        return await self._drive(self._ready(version))

    async def model_versions(self) -> list[int]:
        """See :meth:`AMCClient.model_versions`."""
        return await self._drive(self._model_versions())

    async def routing(self) -> Routing:
        """See :meth:`AMCClient.routing`."""
        return await self._drive(self._routing_now())
