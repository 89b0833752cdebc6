"""Domain errors: what can go wrong, in words a caller can act on.

Everything under `service/` raises these (or plain exceptions for bugs); none of
it imports a transport. The gRPC layer maps each class to a status code in one
table (`service.api.interceptors.STATUS_BY_ERROR`); anything not listed there is
a server fault and becomes INTERNAL with a request id in the log.
"""

from __future__ import annotations


class TLServeError(Exception):
    """A failure that is the caller's to fix, or a known condition."""


class InvalidArgument(TLServeError):
    """A request field is malformed or out of range; the message names it."""


class NotFound(TLServeError):
    """A named dataset, job, model or version does not exist."""


class AlreadyExists(TLServeError):
    """A create call names something that exists already."""


class FailedPrecondition(TLServeError):
    """The request is valid but the system is not in a state to run it (for
    example, weights that must be provisioned first); the message says what to do."""


class ResourceExhausted(TLServeError):
    """A queue, size or memory limit was reached."""


class DeadlineExceeded(TLServeError):
    """The caller's deadline passed before the work could be done (for example while
    a prediction waited in its model's queue); the work was dropped, not done late."""


class Cancelled(TLServeError):
    """The caller cancelled a long call; work not yet started was dropped."""


class Unavailable(TLServeError):
    """The server is shutting down or a dependency is unavailable; retry later."""


class Unimplemented(TLServeError):
    """The RPC is part of the API but this server version does not provide it."""


class ConfigError(TLServeError):
    """Invalid server settings; raised before the server starts."""
