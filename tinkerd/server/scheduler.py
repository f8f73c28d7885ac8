"""Request queue in front of the engine: FIFO lanes, one worker thread per lane.

A lane is a base model. Work on one base runs in submission order (so one training
client's operations never reorder), while different base models run side by side.
The caller gets a `concurrent.futures.Future` at once and never waits on the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Scheduler:
    def __init__(self) -> None:
        self._lanes: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def submit(self, lane: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            executor = self._lanes.get(lane)
            if executor is None:
                executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinkerd-lane")
                self._lanes[lane] = executor
        return executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for executor in lanes:
            executor.shutdown(wait=wait, cancel_futures=not wait)
