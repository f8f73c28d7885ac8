"""APIFuture: the result of a submitted request, usable from sync and async code."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class APIFuture(Generic[T]):
    """`result()` blocks; `await future` or `await future.result_async()` does not."""

    def __init__(self, future: Future[T]):
        self._future = future

    def result(self, timeout: float | None = None) -> T:
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        # shield: a caller's timeout must not cancel work already queued on the engine
        waiter = asyncio.shield(asyncio.wrap_future(self._future))
        return await asyncio.wait_for(waiter, timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def then(self, fn: Callable[[T], U]) -> APIFuture[U]:
        """A future of `fn(result)` (errors pass through)."""
        chained: Future[U] = Future()

        def relay(source: Future[T]) -> None:
            try:
                chained.set_result(fn(source.result()))
            except BaseException as e:  # noqa: BLE001 -- delivered to whoever waits
                chained.set_exception(e)

        self._future.add_done_callback(relay)
        return APIFuture(chained)

    def done(self) -> bool:
        return self._future.done()

    def future(self) -> Future[T]:
        return self._future


def failed(error: BaseException) -> APIFuture[Any]:
    future: Future[Any] = Future()
    future.set_exception(error)
    return APIFuture(future)
