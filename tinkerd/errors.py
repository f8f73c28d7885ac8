"""Errors that cross the engine / transport / client boundary, each with an HTTP status."""

from __future__ import annotations


class TinkerdError(Exception):
    """Base of every error tinkerd raises on purpose."""

    status_code = 500
    category = "server"


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
