"""The service layer: what the HTTP server and the embedded transport share.

`Service` (service.py) takes every verb as a typed request (`tinkerd.requests`) through
`submit(caller, request)`, whose handler (handlers.py) validates, queues, schedules and
packs it over one engine and hands back a future; caller.py is who asks (the embedded
caller or an API key) with its policy; scheduler.py packs passes, futures.py orders
requests by seq_id, store.py is the SQLite store, access.py decides what an API key may
see, metrics.py records training metrics, local_rest.py serves a data directory to a
RestClient, inference/ maps the OpenAI- and Anthropic-compatible APIs onto sampling.
"""

from __future__ import annotations

import threading

from tinkerd.engine import Engine
from tinkerd.service.caller import LOCAL, KeyCaller
from tinkerd.service.config import ServiceConfig
from tinkerd.service.service import Service

__all__ = ["LOCAL", "KeyCaller", "Service", "ServiceConfig", "default_engine"]

_default_engine: Engine | None = None
_default_lock = threading.Lock()


def default_engine() -> Engine:
    """The process-wide embedded engine: every in-process client shares its base models
    (and, through `Service.for_engine`, its scheduler)."""
    global _default_engine
    with _default_lock:
        if _default_engine is None:
            _default_engine = Engine()
        return _default_engine
