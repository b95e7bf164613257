"""What to do with a failed call: translate tritonclient's exception, decide whether to retry, and when."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

from tritonclient.utils import InferenceServerException

from ._routing import version_of
from .errors import (
    AMCError,
    DeadlineExceededError,
    InvalidInputError,
    ModelVersionError,
    ServerUnavailableError,
)

# The caller's mistakes: the server looked at the request and refused it. Never retried.
REJECTED = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE"})
# Faults of the server, not of the request: it could not be reached, was overloaded (a full queue, a queue
# timeout or the text step's in-flight limit is UNAVAILABLE in Triton), or failed while serving (INTERNAL: e.g. "Stub process 'amc_tokenizer_0_0'
# is not healthy" after a Python-backend step died; UNKNOWN: an error without a status). All are worth
# another attempt (after a backoff, or on another replica) and all are ServerUnavailableError.
SERVER_FAULTS = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN"})
RETRYABLE = SERVER_FAULTS


def status(e: InferenceServerException) -> str:
    """tritonclient's ``e.status()`` ("StatusCode.UNAVAILABLE") -> "UNAVAILABLE"; "" when it has none."""
    return str(e.status() or "").removeprefix("StatusCode.")


def message(e: InferenceServerException) -> str:
    return " ".join(str(e.message() or e).split())


def unknown_model(e: InferenceServerException) -> bool:
    """Triton answers a call to a model it has not loaded with "Request for unknown model: ..."
    (INVALID_ARGUMENT in recent releases, UNAVAILABLE in older ones): not worth retrying."""
    return "unknown model" in message(e).lower()


def _too_large(e: InferenceServerException) -> bool:
    return status(e) == "RESOURCE_EXHAUSTED" and "larger than max" in message(e).lower()


def restricted(e: InferenceServerException) -> bool:
    """Triton answers calls to a restricted protocol (a server started with an admin key) with UNAVAILABLE
    "This protocol is restricted, expecting header ...": the server is up, and retrying cannot help."""
    return "is restricted" in message(e).lower()


def overloaded(e: InferenceServerException) -> bool:
    """The server's answers to more load than it serves, all UNAVAILABLE: Triton's when a model's queue is full
    ("Exceeds maximum queue size") or, with a queue timeout (the generated configs set none), a request waited
    too long ("Request timeout expired"); the text step's admission control when its version's pipeline holds
    ``signatures.MAX_IN_FLIGHT`` requests ("overloaded: N requests in flight ...")."""
    text = message(e).lower()
    return "queue size" in text or "timeout expired" in text or "requests in flight" in text


def retryable(e: InferenceServerException) -> bool:
    return status(e) in RETRYABLE and not unknown_model(e) and not _too_large(e) and not restricted(e)


DEFAULT_BACKOFF_S = 0.1  # first wait after a rejection or an unreachable server (AMCClient's backoff_s)
# Longest wait between two attempts: an overloaded server answers the excess at once and drains its bounded
# queues within a second or two, so waiting much longer only wastes the caller's deadline.
MAX_BACKOFF_S = 2.0


def backoff(base_s: float, attempt: int, rng: random.Random) -> float:
    """Exponential backoff with jitter: base * 2**attempt (at most MAX_BACKOFF_S), scaled by a uniform factor
    in [0.5, 1.5)."""
    return min(base_s * (2**attempt), MAX_BACKOFF_S) * (0.5 + rng.random())


def translate(e: InferenceServerException, *, url: str, model: str, timeout_s: float) -> AMCError:
    """tritonclient's exception -> the client's exception (the caller raises it ``from e``)."""
    code, text = status(e), message(e)
    if unknown_model(e):
        version = version_of(model)
        what = f"model version {version}" if version is not None else f"model {model!r}"
        return ModelVersionError(f"{what} is not loaded on the server at {url}: {text}", version=version)
    if _too_large(e):
        return InvalidInputError(
            f"request is larger than the gRPC message limit; send fewer candidates: {text}"
        )
    if restricted(e):
        return AMCError(f"{model} is restricted on the server at {url} (its model-repository API needs the "
                        f"admin key; pass headers=...): {text}")
    if code == "UNAVAILABLE":
        what = "is overloaded" if overloaded(e) else "is not reachable"
        return ServerUnavailableError(f"server at {url} {what} (UNAVAILABLE): {text}", status=code)
    if code == "RESOURCE_EXHAUSTED":
        return ServerUnavailableError(f"server at {url} is overloaded (RESOURCE_EXHAUSTED): {text}", status=code)
    if code in SERVER_FAULTS:
        return ServerUnavailableError(f"server at {url} failed to serve {model!r} ({code}): {text}", status=code)
    if code == "DEADLINE_EXCEEDED":
        return DeadlineExceededError(
            f"no answer from {model!r} at {url} within {timeout_s:g} s (DEADLINE_EXCEEDED)"
        )
    if code in REJECTED:
        return InvalidInputError(f"server rejected the request to {model!r} ({code}): {text}")
    return AMCError(f"call to {model!r} at {url} failed ({code or 'no status'}): {text}")


class Deadline:
    """One request's time budget: every attempt and every backoff sleep comes out of it."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._end = time.monotonic() + timeout_s

    def remaining(self) -> float:
        return self._end - time.monotonic()


# ---- what the client core's request paths yield (see amc_client._core) --------------------------------------
@dataclass(frozen=True)
class Call:
    """One call of tritonclient's API: ``method`` with ``kwargs``, at most ``remaining`` seconds, on ``replica``
    (an ``amc_client._fleet.Replica``). ``method == "infer"`` is an inference (never cancelled: see
    ``AMCClient._infer``)."""

    method: str
    remaining: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    replica: Any = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Detach:
    """A request path of its own (``steps``) that the face runs apart (a thread, a task) while the yielding path
    goes on at once: a routing refresh that no request waits for. The face calls ``done()`` when it ends, however
    it ends, even if it never started."""

    steps: Any  # Steps
    done: Callable[[], None]


# What the core's request paths yield, and what they are sent back.
Steps = Generator["Call | Sleep | Detach", Any, Any]


async def drive(steps: Steps, perform: Callable[[Call | Sleep | Detach], Awaitable[Any]]) -> Any:
    """Run a request path to its end, the one loop of both faces: each op it yields goes to ``perform`` (the face's
    call, sleep or detach), and the path is sent the result, or thrown the tritonclient exception ``perform``
    raised. The asyncio face awaits it; the blocking face's ``perform`` never suspends, so it runs it with
    :func:`run_blocking`."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as done:
            return done.value
        value, error = None, None
        try:
            value = await perform(op)
        except InferenceServerException as e:
            error = e


def run_blocking(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """A coroutine that never suspends (:func:`drive` with the blocking face's ``perform``), run to its end now."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("a blocking request path suspended: its perform awaited something that waits")
