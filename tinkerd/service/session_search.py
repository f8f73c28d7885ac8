"""`RestClient.search_sessions`: a key's sessions, filtered, newest first, in pages.

tinkerd has no organizations or projects: every session is in project `default`, and a
key sees only its own sessions, so owner `accessible` is the same as `own`.
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from tinkerd.engine.checkpoints import CheckpointStore
from tinkerd.errors import InvalidRequestError
from tinkerd.service.store import Store

PROJECT = "default"


class SearchCursor(BaseModel):
    last_created_at: AwareDatetime
    last_session_id: str


class SessionSearch(BaseModel):
    """The SDK's SessionSearchRequest (unknown fields of newer SDKs are ignored)."""

    model_config = ConfigDict(extra="ignore")

    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = Field(default_factory=dict)
    display_name: str | None = Field(default=None, min_length=1)
    owner: dict[str, Any] = Field(default_factory=lambda: {"type": "own"})
    statuses: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    limit: int = Field(default=50, ge=1, le=200)
    cursor: SearchCursor | None = None


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)


def _status(session: dict) -> dict | None:
    """The SDK's SessionStatus: active, client_finished (with the client's reason), or
    None for a session that ended without its client saying so (it expired)."""
    if session["finished"] is None:
        return {"type": "active"}
    reason = session["finish_reason"]
    if reason is None:
        return None
    return {
        "type": "client_finished",
        "reason": {"type": reason.get("type")},
        "detail": reason.get("detail"),
    }


def _status_matches(status: dict | None, queries: list[dict[str, Any]]) -> bool:
    kind: Literal["active", "client_finished"] | None = status and status["type"]
    for query in queries:
        if query.get("type") == kind == "active":
            return True
        if query.get("type") == kind == "client_finished":
            reasons = query.get("reasons")
            if reasons is None or status["reason"]["type"] in reasons:  # type: ignore[index]
                return True
    return False  # failed and cancelled sessions do not exist in tinkerd


def _matches(session: dict, search: SessionSearch) -> bool:
    named = [
        search.session_id is not None and session["session_id"] == search.session_id,
        search.display_name is not None
        and all(
            word in (session["display_name"] or "").lower()
            for word in search.display_name.lower().split()
        ),
    ]
    if (search.session_id is not None or search.display_name is not None) and not any(named):
        return False
    metadata = {k: str(v) for k, v in session["user_metadata"].items()}
    if any(metadata.get(k) != v for k, v in search.user_metadata.items()):
        return False
    return search.statuses is None or _status_matches(_status(session), search.statuses)


def search_sessions(
    store: Store, checkpoints: CheckpointStore, owner: str, search: SessionSearch
) -> dict:
    """One page of the SDK's SessionSearchResponse."""
    if search.owner.get("type") not in ("own", "accessible"):
        raise InvalidRequestError("tinkerd searches by API key: owner must be own or accessible")
    unknown = [p for p in search.project_ids or [] if p != PROJECT]
    if unknown:
        raise InvalidRequestError(f"no project {unknown[0]!r} (tinkerd has one: {PROJECT!r})")
    found = [s for s in store.owner_sessions(owner) if _matches(s, search)]
    if search.cursor is not None:  # newest first: the page starts after the cursor
        after = (search.cursor.last_created_at, search.cursor.last_session_id)
        found = [s for s in found if (_utc(s["created"]), s["session_id"]) < after]
    page = found[: search.limit]

    stored: dict[str, list[int]] = {}  # session id: sizes of its runs' checkpoints
    for info in checkpoints.list():
        stored.setdefault(info.model_id.partition(":")[0], []).append(info.size_bytes)
    summaries = [
        {
            "session_id": s["session_id"],
            "created_at": _utc(s["created"]).isoformat(),
            "owner": owner,
            "project_id": PROJECT,
            "status": _status(s),
            "checkpoints_count": len(stored.get(s["session_id"], [])),
            "display_name": s["display_name"],
            "user_metadata": {k: str(v) for k, v in s["user_metadata"].items()},
            "checkpoint_storage_bytes": sum(stored.get(s["session_id"], [])),
        }
        for s in page
    ]
    more = len(found) > len(page)
    cursor = (
        {"last_created_at": summaries[-1]["created_at"], "last_session_id": page[-1]["session_id"]}
        if more
        else None
    )
    return {"sessions": summaries, "next_cursor": cursor}
