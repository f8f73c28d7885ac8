"""The web dashboard: a page at `/` and the JSON API behind it (`/api/v1/dashboard/...`).

The page and its script hold no data, so they are served to anyone; the script asks for an
API key, keeps it in the tab's sessionStorage and sends it as `X-API-Key` like every other
client, so a key sees only its own runs (another key's answer 404). See docs/dashboard.md.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tinkerd.errors import NotFoundError
from tinkerd.service.metrics import paging, per_step

if TYPE_CHECKING:
    from tinkerd.server.app import Server

API = "/api/v1/dashboard"
PAGE_HEADERS = {
    # Only this origin's script and style run (no inline code, no eval), the page talks
    # only to its own API, and no other site may frame it (clickjacking).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_LABEL_RE = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")


def split_key_label(entry: str) -> tuple[str, str | None]:
    """`tml-xxx=alice` -> (`tml-xxx`, `alice`); an entry without a label is all key. (A key
    ending in base64 padding `=` stays whole: a label must be 1-64 of [A-Za-z0-9_.@+-].)"""
    key, sep, label = entry.partition("=")
    if sep and key and _LABEL_RE.fullmatch(label):
        return key, label
    return entry, None


class Documented(BaseModel):
    """Field docstrings go into the OpenAPI schema."""

    model_config = ConfigDict(use_attribute_docstrings=True)


class RunSummary(Documented):
    model_id: str
    base_model: str
    lora_rank: int
    owner: str
    """The owner key's label (`--api-key KEY=LABEL`), else a fingerprint of it: never the key."""
    steps: int
    """The run's step count at its last recorded optim_step (a run made from a checkpoint
    counts the checkpoint's steps too); 0 before its first."""
    created: float
    """Unix time, seconds."""
    last_activity: float
    """Unix time, seconds, of the run's last recorded operation or status change."""
    status: str
    """active, finished, expired, unloaded, failed, or lost (the server restarted)."""


class RunList(Documented):
    runs: list[RunSummary]
    """The caller's runs, most recently active first."""


class CheckpointSummary(Documented):
    tinker_path: str
    kind: str
    """`weights` (save_state: weights and optimizer) or `sampler_weights`."""
    name: str
    step: int
    """Optimizer steps the run had taken when it was saved."""
    created_at: float
    """Unix time, seconds."""
    size_bytes: int
    has_optimizer: bool


class RunDetail(RunSummary):
    checkpoints: list[CheckpointSummary]
    """Oldest first."""


class RunMetrics(Documented):
    model_id: str
    since_step: int
    metric_names: list[str]
    """Every metric name in `steps`, sorted."""
    steps: list[dict[str, int | float]] = Field(
        description=(
            "One object per step at or after since_step, in step order: `step`, `time` (unix"
            " seconds of its last operation) and its metrics: `loss` (summed over tokens),"
            " `tokens`, `step_time_s` (engine seconds), `grad_norm` (before clipping),"
            " `learning_rate`, and custom-loss terms under their SDK names (e.g."
            " `l2/contribution:sum`). A step still in progress has no `grad_norm` yet."
        )
    )


class BasePaging(Documented):
    resident_runs: int
    """Runs whose adapter is attached to the base model (the resident set)."""
    host_runs: int
    """Paged runs held in host memory (GPU machines)."""
    disk_runs: int
    """Paged runs on disk under the data dir."""
    resident_bytes: int
    """Bytes of the resident runs' weights, gradients and optimizer state."""
    resident_budget_bytes: int | None
    """`--run-budget` (null: none)."""
    max_resident_runs: int | None
    """`--max-resident-runs` (null: none)."""
    page_ins: int
    """Runs paged back in since the server started."""
    page_ins_last_minute: int
    page_in_seconds: float
    """Seconds all page-ins took, together."""
    mean_page_in_seconds: float
    page_outs: int
    page_out_seconds: float
    disk_writes: int
    """Paged runs written to disk."""


class Paging(Documented):
    bases: dict[str, BasePaging]
    """Per base model that has runs: its resident set (docs/multi-tenant.md). Counts of
    every key's runs together, never which runs."""


def add_dashboard(app: FastAPI, server: Server) -> None:
    """Add the page, its assets and the JSON API to `app`. (Routes go on the app itself, not
    through an included APIRouter, so route walks such as tests/e2e/test_isolation.py's see
    them as plain APIRoutes.)"""

    def owner(request: Request) -> str:
        return server.owner(request)

    Owner = Depends(owner)

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_asset("dashboard.html"), headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise NotFoundError(f"no static file {name!r}")
        return Response(_asset(name), media_type=STATIC[name], headers=PAGE_HEADERS)

    def summary(run: dict, steps: dict[str, int]) -> dict:
        return {
            "model_id": run["model_id"],
            "base_model": run["base_model"],
            "lora_rank": run["lora_config"].get("rank", 0),
            "owner": server.owner_label(run["owner"]),
            "steps": steps.get(run["model_id"], 0),
            "created": run["created"],
            "last_activity": run["last_request"],
            "status": run["status"],
        }

    def own_run(model_id: str, who: str) -> dict:
        for run in server.service.store.runs(who):
            if run["model_id"] == model_id:
                return run | {"owner": who}
        raise NotFoundError(f"no training run {model_id!r}")  # another key's looks absent

    @app.get(f"{API}/runs", response_model=RunList)
    def list_runs(who: str = Owner) -> dict:
        """The caller's training runs (another key's are never listed)."""
        steps = server.service.store.run_steps(who)
        runs = [summary(r | {"owner": who}, steps) for r in server.service.store.runs(who)]
        return {"runs": sorted(runs, key=lambda r: -r["last_activity"])}

    @app.get(f"{API}/runs/{{model_id}}", response_model=RunDetail)
    def get_run(model_id: str, who: str = Owner) -> dict:
        """One of the caller's runs with its checkpoints (404 for another key's run)."""
        run = own_run(model_id, who)
        checkpoints = [
            {
                "tinker_path": c.tinker_path,
                "kind": c.kind,
                "name": c.name,
                "step": c.step,
                "created_at": c.created_at,
                "size_bytes": c.size_bytes,
                "has_optimizer": c.has_optimizer,
            }
            for c in server.service.checkpoints.list(model_id)
        ]
        return summary(run, server.service.store.run_steps(who)) | {"checkpoints": checkpoints}

    @app.get(f"{API}/paging", response_model=Paging)
    def paging_stats(who: str = Owner) -> dict:
        """The server's resident sets: runs resident and paged per base model, page-ins
        (total, last minute) and their seconds. Any key may read these server-wide counts."""
        return {"bases": paging(server.service.engine)}

    @app.get(f"{API}/runs/{{model_id}}/metrics", response_model=RunMetrics)
    def run_metrics(
        model_id: str,
        since_step: int = Query(0, ge=0, le=2**53, description="only steps >= this one"),
        who: str = Owner,
    ) -> dict:
        """The run's metrics per optimizer step; poll with since_step = the last step seen
        (it may still grow) to get only what is new. 404 for another key's run."""
        own_run(model_id, who)
        steps = per_step(server.service.store.metric_rows(model_id, since_step))
        names = sorted({k for s in steps for k in s} - {"step", "time"})
        return {
            "model_id": model_id,
            "since_step": since_step,
            "metric_names": names,
            "steps": steps,
        }


def _asset(name: str) -> bytes:
    return resources.files("tinkerd.server").joinpath("static", name).read_bytes()
