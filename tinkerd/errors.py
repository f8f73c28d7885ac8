"""Errors that cross the engine / transport / client boundary, each with an HTTP status."""

from __future__ import annotations


class TinkerdError(Exception):
    """Base of every error tinkerd raises on purpose."""

    status_code = 500
    category = "server"
    retry_after: float | None = None
    """Seconds a client should wait before sending the same request again (429s)."""


class InvalidRequestError(TinkerdError, ValueError):
    """The request is malformed: bad shapes, dtypes, token ids, values or names."""

    status_code = 400
    category = "user"


class NotFoundError(TinkerdError, KeyError):
    """The model, run or object named does not exist (or belongs to someone else)."""

    status_code = 404
    category = "user"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelUnloadedError(InvalidRequestError):
    """The training client's model was unloaded; it takes no more requests."""

    status_code = 409


class AuthenticationError(TinkerdError):
    """No API key, or one the server does not know."""

    status_code = 401
    category = "user"


class QueueFullError(TinkerdError):
    """The server's queue is full: retry after `retry_after` seconds (HTTP 429)."""

    status_code = 429
    category = "server"
    retry_after = 1.0


class QuotaExceededError(TinkerdError):
    """The API key holds as many of something (runs, sessions, uploaded losses) as the
    server allows it (`tinkerd serve --max-...-per-key`): free some first (HTTP 403; not
    retried, since waiting alone does not free anything)."""

    status_code = 403
    category = "user"


class RequestFailedError(TinkerdError):
    """A queued request failed on the server for a reason of the server's own."""

    status_code = 500
    category = "server"


def error_for_status(status: int, message: str) -> TinkerdError:
    """The tinkerd error a client raises for an HTTP error status."""
    by_status = {
        400: InvalidRequestError,
        401: AuthenticationError,
        403: QuotaExceededError,
        404: NotFoundError,
        409: ModelUnloadedError,
        422: InvalidRequestError,
        429: QueueFullError,
    }
    return by_status.get(status, RequestFailedError)(message)
