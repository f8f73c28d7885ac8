"""Giving freed memory back to the operating system when a lane goes idle.

A training pass allocates its activations and gradients on the CPU heap; PyTorch frees
them afterwards, but glibc's malloc keeps most freed pages in its arenas (one per thread
that allocated: the HTTP server's worker threads, the lanes, the sampler), so a server's
RSS stays at its peak: measured on tinkerd/tiny, a first training pass raised RSS by 370
MiB, of which `malloc_trim(0)` returned 210 MiB at once. The scheduler calls `trim_heap`
after every pass (a lane kept busy by a flood never idles: issue 23), and it trims at most
once per `MIN_INTERVAL` seconds and once more after the last pass, so an idle run holds
only its adapter and optimizer state. (On CUDA, PyTorch's caching allocator keeps
device memory for reuse by design; this is about host RAM. Operators may also start the
server with MALLOC_ARENA_MAX=2 to bound the number of arenas.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

MIN_INTERVAL = 2.0  # seconds between trims: a trim walks the whole heap
_lock = threading.Lock()
_last = 0.0
_libc: ctypes.CDLL | None | bool = None
_deferred: threading.Timer | None = None


def _malloc_trim() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False  # not glibc (macOS, musl): nothing to do
    return _libc or None


def trim_heap(force: bool = False) -> bool:
    """Return the heap's free pages to the OS (glibc only); False if not now (not glibc,
    or trimmed less than `MIN_INTERVAL` seconds ago: then once more when the interval is
    over, so the last pass before a pause is always given back)."""
    global _last, _deferred
    libc = _malloc_trim()
    if libc is None:
        return False
    with _lock:
        now = time.monotonic()
        wait = MIN_INTERVAL - (now - _last)
        if not force and wait > 0:
            if _deferred is None:
                _deferred = threading.Timer(wait, _trim_later)
                _deferred.daemon = True
                _deferred.start()
            return False
        _last = now
    libc.malloc_trim(0)
    return True


def _trim_later() -> None:
    global _deferred
    with _lock:
        _deferred = None
    trim_heap()
