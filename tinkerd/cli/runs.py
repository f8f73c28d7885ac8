"""`tinkerd runs show RUN [--metrics]`: a run, its checkpoints and its per-step metrics, read
from a server's dashboard API (`/api/v1/dashboard/...`, see docs/dashboard.md)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from urllib.parse import quote

COLUMNS = ["step", "loss", "grad_norm", "learning_rate", "tokens", "step_time_s"]


def add_show_command(runs_sub: argparse._SubParsersAction) -> None:
    """Register `show` under `tinkerd runs`."""
    show = runs_sub.add_parser("show", help="a run, its checkpoints and (--metrics) its metrics")
    show.add_argument("run", help="the run's model_id (training_run_id)")
    show.add_argument("--metrics", action="store_true", help="also print its metrics per step")
    show.add_argument("--json", action="store_true", help="print the API's JSON instead")
    show.add_argument(
        "--base-url",
        default=os.environ.get("TINKERD_BASE_URL", "http://127.0.0.1:8000"),
        help="the server (default: $TINKERD_BASE_URL or http://127.0.0.1:8000)",
    )
    show.add_argument(
        "--api-key",
        default=os.environ.get("TINKER_API_KEY", ""),
        help="API key (default: $TINKER_API_KEY)",
    )
    show.set_defaults(func=show_run)


def _get(args: argparse.Namespace, path: str) -> dict:
    import httpx

    url = f"{args.base_url.rstrip('/')}/api/v1/dashboard{path}"
    response = httpx.get(url, headers={"X-API-Key": args.api_key}, timeout=30)
    if response.status_code != 200:
        detail = response.json().get("detail", response.text) if response.content else ""
        raise SystemExit(f"tinkerd: {response.status_code} from {url}: {detail}")
    return response.json()


def show_run(args: argparse.Namespace) -> int:
    run_path = f"/runs/{quote(args.run, safe='')}"
    run = _get(args, run_path)
    metrics = _get(args, f"{run_path}/metrics") if args.metrics else None
    if args.json:
        print(json.dumps(run | ({"metrics": metrics} if metrics else {}), indent=2))
        return 0
    print(f"run            {run['model_id']}")
    print(f"base model     {run['base_model']} (LoRA rank {run['lora_rank']})")
    print(f"owner          {run['owner']}")
    print(f"steps          {run['steps']}")
    print(f"last activity  {_time(run['last_activity'])}")
    print(f"status         {run['status']}")
    print(f"checkpoints    {len(run['checkpoints']) or 'none'}")
    for c in run["checkpoints"]:
        print(f"  {c['tinker_path']}  step {c['step']}  {_time(c['created_at'])}")
    if metrics is not None:
        print()
        print(format_table(metrics["steps"], metrics["metric_names"]))
    return 0


def format_table(steps: list[dict], names: list[str]) -> str:
    """One line per step: the main metrics, then any others (custom-loss terms)."""
    columns = [c for c in COLUMNS if c == "step" or c in names]
    columns += [n for n in names if n not in COLUMNS]
    rows = [columns] + [[_cell(s.get(c)) for c in columns] for s in steps]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def _cell(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.6g}"


def _time(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix).isoformat(sep=" ", timespec="seconds")
