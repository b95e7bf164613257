"""The one error of the contract: a request the server refuses."""


class RequestError(ValueError):
    """A problem with one request's inputs: the served steps answer that request INVALID_ARGUMENT with
    ``"<model>: <message>"``, and serve the others."""
