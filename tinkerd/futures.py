"""Small helpers over `concurrent.futures.Future`, shared by client, service and server."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def done(value: Any) -> Future:
    """A future already resolved to `value` (an answer that needed no queueing)."""
    future: Future = Future()
    future.set_result(value)
    return future


def failed_future(error: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


def chained(future: Future, fn: Callable[[Any], Any]) -> Future:
    """A future of `fn(future's result)`; errors pass through."""
    out: Future = Future()

    def relay(source: Future) -> None:
        try:
            out.set_result(fn(source.result()))
        except BaseException as e:  # noqa: BLE001 -- delivered to whoever waits
            out.set_exception(e)

    future.add_done_callback(relay)
    return out
