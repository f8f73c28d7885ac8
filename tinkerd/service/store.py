"""SQLite record of sessions, training runs and finished futures.

One file (`<data_dir>/tinkerd.sqlite3`) in WAL mode, so a finished result can be fetched
again after the client reconnects, and after the server restarts. Owners are API-key
fingerprints, never keys. Training metrics (one row per metric per operation, see
service/metrics.py) feed the dashboard.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL,
    last_heartbeat REAL NOT NULL, finished REAL, tags TEXT, user_metadata TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    model_id TEXT PRIMARY KEY, owner TEXT NOT NULL, session_id TEXT NOT NULL,
    base_model TEXT NOT NULL, lora_config TEXT NOT NULL, created REAL NOT NULL,
    last_request REAL NOT NULL, status TEXT NOT NULL, user_metadata TEXT
);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY, owner TEXT NOT NULL, model_id TEXT, kind TEXT NOT NULL,
    status TEXT NOT NULL, content_type TEXT, body BLOB, created REAL NOT NULL, finished REAL
);
CREATE INDEX IF NOT EXISTS runs_by_owner ON runs (owner);
CREATE TABLE IF NOT EXISTS published (
    tinker_path TEXT PRIMARY KEY, owner TEXT NOT NULL, published REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS age_recipients (tinker_path TEXT PRIMARY KEY, recipients TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending_saves (
    request_id TEXT PRIMARY KEY, tinker_path TEXT NOT NULL, content_type TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS link_revisions (tinker_path TEXT PRIMARY KEY, revision INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoint_ttl (tinker_path TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    model_id TEXT NOT NULL, step INTEGER NOT NULL, kind TEXT NOT NULL, time REAL NOT NULL,
    name TEXT NOT NULL, value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_by_run ON metrics (model_id, step);
"""


@dataclass
class StoredFuture:
    request_id: str
    owner: str
    model_id: str | None
    kind: str
    status: str  # pending | done | failed
    content_type: str | None
    body: bytes | None


class Store:
    def __init__(
        self, data_dir: Path, clock: Callable[[], float] = time.time, max_metric_steps: int = 10_000
    ):
        self.clock = clock  # seconds since the epoch; injectable so tests need not wait
        self.max_metric_steps = max_metric_steps
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "tinkerd.sqlite3"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        for column in ("display_name", "finish_reason"):  # added later: older files lack them
            if column not in columns:
                self._db.execute(f"ALTER TABLE sessions ADD COLUMN {column} TEXT")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(futures)")}
        if "retrieved" not in columns:  # a data directory from before retention
            self._db.execute("ALTER TABLE futures ADD COLUMN retrieved REAL")
        self._lock = threading.Lock()

    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def restorable_runs(self) -> list[str]:
        """At start-up, before `fail_unfinished`: the runs that were active when the
        server stopped, in a session still open, with no request of theirs in flight
        (whose effect a client could not tell): those a restart may take back."""
        busy = {m for (m,) in self._exec("SELECT model_id FROM futures WHERE status='pending'")}
        rows = self._exec(
            "SELECT r.model_id FROM runs r JOIN sessions s ON r.session_id=s.session_id "
            "WHERE r.status='active' AND s.finished IS NULL"
        )
        return [model_id for (model_id,) in rows if model_id not in busy]

    def fail_unfinished(
        self,
        reason: str,
        saved: Callable[[str, float], bool] = lambda path, since: False,
        restored: Collection[str] = (),
    ) -> int:
        """At start-up: requests in flight when the server stopped can never finish. A
        save whose checkpoint is complete on disk (`saved(tinker_path, request created)`:
        written after the request came) did finish, only its answer was not recorded:
        it is answered as done, so a retry never meets "already exists". Active runs are
        `lost`, except those `restored` (taken back from their page files)."""
        body = json.dumps({"error": reason, "category": "server"}).encode()
        with self._lock:
            saves = self._db.execute(
                "SELECT f.request_id, s.tinker_path, s.content_type, s.body, f.created "
                "FROM futures f JOIN pending_saves s ON f.request_id=s.request_id "
                "WHERE f.status='pending'"
            ).fetchall()
            for request_id, path, content_type, done, created in saves:
                if saved(path, created):
                    self._db.execute(
                        "UPDATE futures SET status='done', content_type=?, body=?, finished=? "
                        "WHERE request_id=?",
                        (content_type, done, self.clock(), request_id),
                    )
            self._db.execute("DELETE FROM pending_saves")
            cursor = self._db.execute(
                "UPDATE futures SET status='failed', content_type='application/json', body=?, "
                "finished=? WHERE status='pending'",
                (body, self.clock()),
            )
            self._db.execute("UPDATE runs SET status='lost' WHERE status='active'")
            self._db.executemany(
                "UPDATE runs SET status='active' WHERE model_id=?", [(m,) for m in restored]
            )
            return cursor.rowcount

    # ---------------------------------------------------------------- sessions

    def add_session(
        self,
        session_id: str,
        owner: str,
        tags: list[str],
        metadata: dict,
        display_name: str | None = None,
    ) -> None:
        now = self.clock()
        self._exec(
            "INSERT INTO sessions (session_id, owner, created, last_heartbeat, finished, tags, "
            "user_metadata, display_name) VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
            (session_id, owner, now, now, json.dumps(tags), json.dumps(metadata), display_name),
        )

    def session_owner(self, session_id: str) -> str | None:
        rows = self._exec("SELECT owner FROM sessions WHERE session_id=?", (session_id,))
        return rows[0][0] if rows else None

    def session_finished(self, session_id: str) -> bool:
        rows = self._exec("SELECT finished FROM sessions WHERE session_id=?", (session_id,))
        return bool(rows and rows[0][0] is not None)

    def heartbeat(self, session_id: str) -> None:
        self._exec(
            "UPDATE sessions SET last_heartbeat=? WHERE session_id=?", (self.clock(), session_id)
        )

    def expire_sessions(self, last_heartbeat_before: float) -> list[str]:
        """Finish every open session whose last heartbeat is older than the cutoff."""
        with self._lock:
            rows = self._db.execute(
                "SELECT session_id FROM sessions WHERE finished IS NULL AND last_heartbeat < ?",
                (last_heartbeat_before,),
            ).fetchall()
            now = self.clock()
            for (session_id,) in rows:
                self._db.execute(
                    "UPDATE sessions SET finished=? WHERE session_id=?", (now, session_id)
                )
        return [r[0] for r in rows]

    def open_sessions(self, owner: str) -> int:
        rows = self._exec(
            "SELECT COUNT(*) FROM sessions WHERE owner=? AND finished IS NULL", (owner,)
        )
        return rows[0][0]

    def active_runs(self, session_id: str) -> list[str]:
        rows = self._exec(
            "SELECT model_id FROM runs WHERE session_id=? AND status='active'", (session_id,)
        )
        return [r[0] for r in rows]

    def finish_session(self, session_id: str, reason: dict | None = None) -> None:
        """Mark the session finished; `reason` is what its client said (the first one wins)."""
        self._exec(
            "UPDATE sessions SET finished=COALESCE(finished, ?), "
            "finish_reason=COALESCE(finish_reason, ?) WHERE session_id=?",
            (self.clock(), json.dumps(reason) if reason else None, session_id),
        )

    def sessions(self, owner: str, limit: int, offset: int) -> list[str]:
        """A page of the owner's session ids, oldest first."""
        rows = self._exec(
            "SELECT session_id FROM sessions WHERE owner=? ORDER BY created, session_id "
            "LIMIT ? OFFSET ?",
            (owner, limit, offset),
        )
        return [r[0] for r in rows]

    def owner_sessions(self, owner: str) -> list[dict]:
        """Every session of the owner, newest first: session_id, created, finished,
        finish_reason (a dict or None), display_name, user_metadata."""
        rows = self._exec(
            "SELECT session_id, created, finished, finish_reason, display_name, user_metadata "
            "FROM sessions WHERE owner=? ORDER BY created DESC, session_id DESC",
            (owner,),
        )
        keys = ("session_id", "created", "finished", "finish_reason", "display_name")
        return [
            dict(zip(keys, row))
            | {
                "finish_reason": json.loads(row[3]) if row[3] else None,
                "user_metadata": json.loads(row[5] or "{}"),
            }
            for row in rows
        ]

    def session_metadata(self, session_id: str) -> tuple[dict, str | None]:
        """(user_metadata, display_name) of a session."""
        rows = self._exec(
            "SELECT user_metadata, display_name FROM sessions WHERE session_id=?", (session_id,)
        )
        return (json.loads(rows[0][0] or "{}"), rows[0][1]) if rows else ({}, None)

    def session_runs(self, session_id: str) -> list[str]:
        """Every run created in the session (ended ones too), oldest first."""
        rows = self._exec(
            "SELECT model_id FROM runs WHERE session_id=? ORDER BY created", (session_id,)
        )
        return [r[0] for r in rows]

    # ---------------------------------------------------------------- runs

    def add_run(
        self, model_id: str, owner: str, session_id: str, base_model: str, lora: dict, meta: dict
    ) -> None:
        now = self.clock()
        self._exec(
            "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?)",
            (model_id, owner, session_id, base_model, json.dumps(lora), now, now, json.dumps(meta)),
        )

    def run_owner(self, model_id: str) -> str | None:
        rows = self._exec("SELECT owner FROM runs WHERE model_id=?", (model_id,))
        return rows[0][0] if rows else None

    def run_owner_status(self, model_id: str) -> tuple[str | None, str | None]:
        rows = self._exec("SELECT owner, status FROM runs WHERE model_id=?", (model_id,))
        return rows[0] if rows else (None, None)

    def count_active_runs(self, owner: str) -> int:
        rows = self._exec("SELECT COUNT(*) FROM runs WHERE owner=? AND status='active'", (owner,))
        return rows[0][0]

    def touch_run(self, model_id: str, status: str | None = None) -> None:
        if status:
            self._exec(
                "UPDATE runs SET last_request=?, status=? WHERE model_id=?",
                (self.clock(), status, model_id),
            )
        else:
            self._exec("UPDATE runs SET last_request=? WHERE model_id=?", (self.clock(), model_id))

    def set_run_status(self, model_id: str, status: str) -> None:
        """A run's status changed without a request of its own (its session ended):
        its last request time stays what it was."""
        self._exec("UPDATE runs SET status=? WHERE model_id=?", (status, model_id))

    def runs(self, owner: str | None) -> list[dict]:
        """Runs of one owner (None: everyone's), oldest first."""
        where, args = ("WHERE owner=?", (owner,)) if owner is not None else ("", ())
        rows = self._exec(
            "SELECT model_id, owner, base_model, lora_config, created, last_request, status, "
            f"user_metadata FROM runs {where} ORDER BY created",
            args,
        )
        keys = ("model_id", "owner", "base_model", "lora_config", "created", "last_request")
        return [
            dict(zip(keys, row))
            | {
                "status": row[6],
                "lora_config": json.loads(row[3]),
                "user_metadata": json.loads(row[7] or "{}"),
            }
            for row in rows
        ]

    # ---------------------------------------------------------------- published checkpoints

    def set_published(self, tinker_path: str, owner: str, public: bool) -> bool:
        """Publish (or unpublish) a checkpoint; False if it already was (or was not).
        A change revokes the checkpoint's signed links (`link_revision`)."""
        with self._lock:
            if public:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO published VALUES (?, ?, ?)",
                    (tinker_path, owner, self.clock()),
                )
            else:
                cursor = self._db.execute(
                    "DELETE FROM published WHERE tinker_path=?", (tinker_path,)
                )
            changed = cursor.rowcount == 1
            if changed:
                self._revoke_links(tinker_path)
            return changed

    def _revoke_links(self, tinker_path: str) -> None:
        self._db.execute(
            "INSERT INTO link_revisions VALUES (?, 1) ON CONFLICT(tinker_path) "
            "DO UPDATE SET revision = revision + 1",
            (tinker_path,),
        )

    def revoke_links(self, tinker_path: str) -> None:
        """Revoke every signed link to the checkpoint given so far, for good."""
        with self._lock:
            self._revoke_links(tinker_path)

    def link_revision(self, tinker_path: str) -> int:
        """How many times the checkpoint's signed links were revoked: signed into each
        link, and only ever growing, so a revoked link never comes back (publish then
        unpublish restores the published flag, not the revision)."""
        rows = self._exec("SELECT revision FROM link_revisions WHERE tinker_path=?", (tinker_path,))
        return rows[0][0] if rows else 0

    def published(self) -> set[str]:
        """Tinker paths of every published checkpoint."""
        return {row[0] for row in self._exec("SELECT tinker_path FROM published")}

    def set_expiry(self, tinker_path: str, expires: float | None) -> None:
        """When (unix seconds) the checkpoint is to be deleted; None: never."""
        if expires is None:
            self._exec("DELETE FROM checkpoint_ttl WHERE tinker_path=?", (tinker_path,))
        else:
            self._exec(
                "INSERT OR REPLACE INTO checkpoint_ttl VALUES (?, ?)", (tinker_path, expires)
            )

    def set_age_recipients(self, tinker_path: str, recipients: list[str]) -> None:
        """The age recipients an external weights checkpoint is encrypted to ([]: none)."""
        self._exec(
            "INSERT OR REPLACE INTO age_recipients VALUES (?, ?)",
            (tinker_path, json.dumps(recipients)),
        )

    def age_recipients(self, tinker_path: str) -> list[str]:
        rows = self._exec(
            "SELECT recipients FROM age_recipients WHERE tinker_path=?", (tinker_path,)
        )
        return json.loads(rows[0][0]) if rows else []

    def expiries(self) -> dict[str, float]:
        return dict(self._exec("SELECT tinker_path, expires FROM checkpoint_ttl"))

    # ---------------------------------------------------------------- futures

    def add_future(
        self,
        request_id: str,
        owner: str,
        model_id: str | None,
        kind: str,
        saves: tuple[str, str, bytes] | None = None,
    ) -> None:
        """A request in flight. `saves`: (tinker path, content type, body) of a save
        request's answer, recorded as its result at start-up if the server died after the
        checkpoint was complete but before the answer was (`fail_unfinished`)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO futures (request_id, owner, model_id, kind, status, created) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                (request_id, owner, model_id, kind, self.clock()),
            )
            if saves is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO pending_saves VALUES (?, ?, ?, ?)",
                    (request_id, *saves),
                )

    def finish_future(self, request_id: str, status: str, content_type: str, body: bytes) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE futures SET status=?, content_type=?, body=?, finished=? "
                "WHERE request_id=?",
                (status, content_type, body, self.clock(), request_id),
            )
            self._db.execute("DELETE FROM pending_saves WHERE request_id=?", (request_id,))

    def future(self, request_id: str) -> StoredFuture | None:
        rows = self._exec(
            "SELECT request_id, owner, model_id, kind, status, content_type, body FROM futures "
            "WHERE request_id=?",
            (request_id,),
        )
        return StoredFuture(*rows[0]) if rows else None

    def mark_retrieved(self, request_id: str) -> None:
        self._exec(
            "UPDATE futures SET retrieved=? WHERE request_id=? AND retrieved IS NULL",
            (self.clock(), request_id),
        )

    def prune_futures(self, retention: float, grace: float) -> int:
        """Forget finished results: `retention` seconds after they finished, or `grace`
        seconds after they were first retrieved; how many."""
        now = self.clock()
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM futures WHERE status!='pending' AND "
                "(finished < ? OR (retrieved IS NOT NULL AND retrieved < ?))",
                (now - retention, now - grace),
            )
            return cursor.rowcount

    # ---------------------------------------------------------------- metrics

    def add_metrics(self, model_id: str, step: int, kind: str, values: dict[str, float]) -> None:
        """Record one operation's metrics at optimizer step `step`; it is the run's last
        activity."""
        now = self.clock()
        rows = [(model_id, step, kind, now, name, value) for name, value in values.items()]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("UPDATE runs SET last_request=? WHERE model_id=?", (now, model_id))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        if kind == "optim_step" and step % 64 == 0:
            self.thin_metrics(model_id, self.max_metric_steps)

    def thin_metrics(self, model_id: str, max_steps: int) -> int:
        """While the run has metrics at more than `max_steps` steps, drop every other step
        of the older half; rows deleted. The newest `max_steps // 2` steps stay exact, old
        history gets coarser, and the run keeps at most `max_steps` steps."""
        deleted = 0
        with self._lock:
            while True:
                steps = [
                    r[0]
                    for r in self._db.execute(
                        "SELECT DISTINCT step FROM metrics WHERE model_id=? ORDER BY step",
                        (model_id,),
                    )
                ]
                if len(steps) <= max(max_steps, 2):
                    return deleted
                drop = [(model_id, s) for s in steps[: len(steps) // 2][1::2]]
                cursor = self._db.executemany(
                    "DELETE FROM metrics WHERE model_id=? AND step=?", drop
                )
                deleted += cursor.rowcount

    def metric_rows(self, model_id: str, since_step: int = 0) -> list[tuple]:
        """`(step, kind, time, name, value)` of the run's operations at steps >= since_step,
        in the order they were recorded."""
        return self._exec(
            "SELECT step, kind, time, name, value FROM metrics WHERE model_id=? AND step>=? "
            "ORDER BY step, rowid",
            (model_id, since_step),
        )

    def run_steps(self, owner: str) -> dict[str, int]:
        """Optimizer steps recorded per run of `owner` (runs with none are left out)."""
        rows = self._exec(
            "SELECT m.model_id, MAX(m.step) FROM metrics m JOIN runs r ON m.model_id=r.model_id "
            "WHERE r.owner=? AND m.kind='optim_step' GROUP BY m.model_id",
            (owner,),
        )
        return dict(rows)
