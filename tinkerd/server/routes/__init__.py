"""The wire protocol's routes, by concern: each module's `router(server)` decodes HTTP,
calls `server.service` with the caller's identity, and encodes the answer."""

from typing import Annotated

from fastapi import Query

API = "/api/v1"
MAX_PAGE = 10_000
Limit = Annotated[int, Query(ge=0, le=MAX_PAGE)]
"""A listing's page size: bounded, so no number reaches SQLite (or memory) unchecked."""
Offset = Annotated[int, Query(ge=0, le=2**62)]
