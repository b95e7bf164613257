"""The client's exceptions. Every error the client raises is an :class:`AMCError`, chained ``from`` its cause.

``AMCError``
 ├─ ``InvalidInputError``       the caller's mistake: a client-side check, or the server answered
 │                              INVALID_ARGUMENT / OUT_OF_RANGE. Fix the request; retrying cannot help.
 ├─ ``ServerUnavailableError``  the server's fault: not reachable or overloaded (UNAVAILABLE: a full
 │                              queue, the in-flight limit; RESOURCE_EXHAUSTED), or it failed while serving (INTERNAL, UNKNOWN, e.g. a
 │                              dead Python-backend step). Retried with backoff; raised after the retries.
 │                              Retryable: on another replica, or later on this one.
 ├─ ``DeadlineExceededError``   no answer within ``timeout_s``
 ├─ ``ModelVersionError``       the requested model version is not loaded
 └─ ``MixedVersionError``       the ensemble's steps disagreed on the model version (``model_version == -1``)

gRPC status -> exception (``_calls.translate``):

=====================================  =========================  ================================
status                                 exception                  retried
=====================================  =========================  ================================
INVALID_ARGUMENT, OUT_OF_RANGE         InvalidInputError          no
UNAVAILABLE, RESOURCE_EXHAUSTED        ServerUnavailableError     yes
INTERNAL, UNKNOWN                      ServerUnavailableError     yes
DEADLINE_EXCEEDED                      DeadlineExceededError      no (a fleet: on another replica)
"Request for unknown model" (any)      ModelVersionError          no
message larger than the gRPC limit     InvalidInputError          no
anything else                          AMCError                   no
=====================================  =========================  ================================
"""

from __future__ import annotations

from collections.abc import Sequence


class AMCError(Exception):
    """Base class of every error the AMC client raises."""


class InvalidInputError(AMCError, ValueError):
    """The request is invalid: caught by the client's checks, or rejected by the server or the model."""


class ServerUnavailableError(AMCError, ConnectionError):
    """The server could not serve the request, through no fault of the request: not reachable or overloaded
    (gRPC UNAVAILABLE, RESOURCE_EXHAUSTED) or failed while serving it (INTERNAL, UNKNOWN). Retryable.

    ``status``: the gRPC status name of the last attempt ("" for a client-side condition).
    """

    retryable = True

    def __init__(self, message: str, *, status: str = "") -> None:
        super().__init__(message)
        self.status = status


class DeadlineExceededError(AMCError, TimeoutError):
    """The server did not answer within the client's ``timeout_s``."""


class ModelVersionError(AMCError, LookupError):
    """The requested model version is not loaded on the server.

    ``version`` is the version asked for (``None`` for the unversioned ``amc`` ensemble); ``loaded`` the
    versions the server has ready, or ``None`` when they could not be read.
    """

    def __init__(
        self, message: str, *, version: int | None = None, loaded: Sequence[int] | None = None
    ) -> None:
        super().__init__(message)
        self.version = version
        self.loaded = None if loaded is None else list(loaded)


class MixedVersionError(AMCError):
    """A response was not scored by one model version (the steps disagreed, or not the version pinned)."""
