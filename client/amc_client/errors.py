"""The client's exceptions. Every error the client raises is an :class:`AMCError`, chained ``from`` its cause.

``AMCError``
 ├─ ``InvalidInputError``       bad query/candidates (client-side check, or the server/model rejected them)
 ├─ ``ServerUnavailableError``  server not reachable or overloaded (after the retries)
 ├─ ``DeadlineExceededError``   no answer within ``timeout_s``
 ├─ ``ModelVersionError``       the requested model version is not loaded
 └─ ``MixedVersionError``       the ensemble's steps disagreed on the model version (``model_version == -1``)
"""

from __future__ import annotations

from collections.abc import Sequence


class AMCError(Exception):
    """Base class of every error the AMC client raises."""


class InvalidInputError(AMCError, ValueError):
    """The request is invalid: caught by the client's checks, or rejected by the server or the model."""


class ServerUnavailableError(AMCError, ConnectionError):
    """The server could not be reached (gRPC UNAVAILABLE) or stayed overloaded (RESOURCE_EXHAUSTED)."""


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
