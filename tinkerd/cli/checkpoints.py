"""`tinkerd runs|checkpoints|export`: the RestClient from the command line.

Each subcommand talks to a server when given `--base-url` (or `TINKERD_BASE_URL`), with
`--api-key` (or `TINKER_API_KEY`), and otherwise works on the data directory
(`--data-dir`, `TINKERD_DATA_DIR`, default `~/.tinkerd`) directly. `register` returns
the `runs` and `checkpoints` sub-parsers so other modules can add subcommands to them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """--base-url, --api-key, --data-dir and --json, as every REST subcommand takes them."""
    parser.add_argument(
        "--base-url",
        default=os.environ.get("TINKERD_BASE_URL"),
        help="a tinkerd server (default: $TINKERD_BASE_URL; none: the local data dir)",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("TINKER_API_KEY"), help="default: $TINKER_API_KEY"
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("TINKERD_DATA_DIR", "~/.tinkerd"),
        help="used without a server (default: $TINKERD_DATA_DIR or ~/.tinkerd)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def rest_client(args: argparse.Namespace):
    """The RestClient the arguments name: a server's, or the data dir's."""
    from tinkerd.client.rest_client import RestClient

    if args.base_url:
        return RestClient(args.base_url, args.api_key)
    return RestClient(data_dir=args.data_dir)


def _command(fn: Callable[[argparse.Namespace, Any], int]) -> Callable[[argparse.Namespace], int]:
    """Run `fn(args, client)`; a tinkerd error is a one-line message and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from tinkerd.errors import TinkerdError

        client = None
        try:
            client = rest_client(args)
            return fn(args, client)
        except TinkerdError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            if client is not None:
                client.close()

    return run


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def _when(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


# ---------------------------------------------------------------- runs


def _every_page(list_page: Callable[..., Any], field: str) -> list:
    """All items of a paged listing (`list_page(limit=, offset=)` returning a future)."""
    items: list = []
    while True:
        page = list_page(limit=100, offset=len(items)).result()
        items += getattr(page, field)
        if not getattr(page, field) or len(items) >= page.cursor.total_count:
            return items


def _runs_list(args: argparse.Namespace, client: Any) -> int:
    runs = _every_page(client.list_training_runs, "training_runs")
    header = ["RUN", "BASE MODEL", "RANK", "LAST REQUEST (UTC)", "LAST CHECKPOINT"]
    return _listing(args, runs, header, _run_row)


def _run_row(r: Any) -> list[str]:
    last = _newest_checkpoint(r)
    return [r.training_run_id, r.base_model, str(r.lora_rank), _when(r.last_request_time), last]


def _newest_checkpoint(run: Any) -> str:
    """The path of a run's newest checkpoint, training state or sampler weights."""
    saved = [c for c in (run.last_checkpoint, run.last_sampler_checkpoint) if c is not None]
    return max(saved, key=lambda c: c.time).tinker_path if saved else "-"


def _listing(args: argparse.Namespace, items: list, header: list[str], row: Any) -> int:
    """`items` as JSON (`--json`) or as a table of `row(item)`s under `header`."""
    if args.json:
        print(json.dumps([item.model_dump(mode="json") for item in items], indent=2))
    else:
        _table([row(item) for item in items], header)
    return 0


# ---------------------------------------------------------------- checkpoints


def _checkpoints_list(args: argparse.Namespace, client: Any) -> int:
    if args.run:
        checkpoints = client.list_checkpoints(args.run).result().checkpoints
    else:
        checkpoints = _every_page(client.list_user_checkpoints, "checkpoints")
    header = ["TINKER PATH", "TYPE", "TIME (UTC)", "SIZE", "PUBLIC"]
    return _listing(args, checkpoints, header, _checkpoint_row)


def _checkpoint_row(c: Any) -> list[str]:
    size = f"{(c.size_bytes or 0) / 1e6:.1f} MB"
    return [c.tinker_path, c.checkpoint_type, _when(c.time), size, "yes" if c.public else "no"]


def _checkpoints_download(args: argparse.Namespace, client: Any) -> int:
    out = client.download_checkpoint(args.path, Path(args.output)).result()
    print(f"{args.path} -> {out} (a PEFT adapter directory; files checked against sha256)")
    return 0


def _checkpoints_delete(args: argparse.Namespace, client: Any) -> int:
    client.delete_checkpoint_from_tinker_path(args.path).result()
    print(f"deleted {args.path}")
    return 0


def _checkpoints_publish(args: argparse.Namespace, client: Any) -> int:
    if args.undo:
        client.unpublish_checkpoint_from_tinker_path(args.path).result()
        print(f"{args.path} is private again")
    else:
        client.publish_checkpoint_from_tinker_path(args.path).result()
        print(f"{args.path} is published: every API key of the server may read it")
    return 0


# ---------------------------------------------------------------- export


def _export(args: argparse.Namespace, client: Any) -> int:
    """Download the checkpoint (checked), then fold its LoRA into the base model (`--merged`)
    or write that base with its `lm_head` untied (`--untied-base`, for PEFT tools that call
    `tie_weights()`); the base is the one `--base` names, else the source its base's served
    name maps to under `--model` (as `serve --model NAME=SOURCE` mapped it), else that name."""
    from tinkerd.engine.checkpoints import CheckpointStore, export_merged, export_untied_base
    from tinkerd.engine.models import parse_model_specs, resolve_model_path
    from tinkerd.errors import InvalidRequestError
    from tinkerd.paths import parse_tinker_path

    out = Path(args.merged or args.untied_base)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequestError(f"{out} exists and is not an empty directory")
    try:
        mapping = parse_model_specs(args.model)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
    model_id, kind, name = parse_tinker_path(args.path)
    with tempfile.TemporaryDirectory(prefix="tinkerd-export-") as tmp:
        client.download_checkpoint(args.path, Path(tmp) / model_id / kind / name).result()
        info = CheckpointStore(Path(tmp), recover=False).get(model_id, kind, name)
        source = args.base or mapping.get(info.base_model, info.base_model)
        try:
            if args.merged:
                export_merged(resolve_model_path(source), info, out)
            else:
                tied = export_untied_base(resolve_model_path(source), out)
        except (OSError, ValueError) as e:
            raise InvalidRequestError(
                f"cannot load base model {source!r} ({e}); if the server served it under "
                f"another name, pass --model {info.base_model}=SOURCE as serve had, or "
                "--base SOURCE"
            ) from None
    if args.merged:
        print(f"{args.path} merged into {source} -> {out} (Hugging Face format)")
    else:
        how = "lm_head untied from the embeddings" if tied else "it had no tied lm_head"
        print(f"base {source} of {args.path} -> {out} ({how}); load the adapter onto it")
    return 0


# ---------------------------------------------------------------- parsers


def register(sub: argparse._SubParsersAction) -> dict[str, argparse._SubParsersAction]:
    """Add `runs`, `checkpoints` and `export` to the top-level sub-parsers; returns the
    `runs` and `checkpoints` sub-parsers (add more subcommands to them freely)."""

    def command(
        group: argparse._SubParsersAction, name: str, fn: Callable, help: str
    ) -> argparse.ArgumentParser:
        parser = group.add_parser(name, help=help)
        add_connection_args(parser)
        parser.set_defaults(func=_command(fn))
        return parser

    runs = sub.add_parser("runs", help="training runs").add_subparsers(
        dest="runs_command", required=True
    )
    command(runs, "list", _runs_list, "list training runs")

    checkpoints = sub.add_parser("checkpoints", help="saved checkpoints").add_subparsers(
        dest="checkpoints_command", required=True
    )
    listing = command(checkpoints, "list", _checkpoints_list, "list checkpoints (newest first)")
    listing.add_argument("--run", help="only this training run's (oldest first)")
    download = command(
        checkpoints, "download", _checkpoints_download, "download a checkpoint's directory"
    )
    download.add_argument("path", metavar="TINKER_PATH")
    download.add_argument("-o", "--output", required=True, help="directory to create")
    delete = command(checkpoints, "delete", _checkpoints_delete, "delete a checkpoint")
    delete.add_argument("path", metavar="TINKER_PATH")
    publish = command(
        checkpoints, "publish", _checkpoints_publish, "let every API key read a checkpoint"
    )
    publish.add_argument("path", metavar="TINKER_PATH")
    publish.add_argument("--undo", action="store_true", help="unpublish")

    export = command(
        sub,
        "export",
        _export,
        "write a checkpoint merged into its base, or the base untied (HF format)",
    )
    export.add_argument("path", metavar="TINKER_PATH")
    out = export.add_mutually_exclusive_group(required=True)
    out.add_argument("--merged", metavar="OUT", help="directory to create: base + LoRA merged")
    out.add_argument(
        "--untied-base",
        metavar="OUT",
        help="directory to create: the base with lm_head untied, onto which PEFT tools that "
        "call tie_weights() (lm-eval hf --peft) load a train_unembed adapter of a tied base",
    )
    export.add_argument(
        "--base",
        metavar="SOURCE",
        help="base model to merge into (local dir, hub id, smollm2, tinkerd/tiny-chat); "
        "default: the checkpoint's base model, through --model",
    )
    export.add_argument(
        "--model",
        action="append",
        metavar="NAME=SOURCE",
        help="the server's `serve --model NAME=SOURCE` mapping (repeatable): a checkpoint "
        "on base NAME is merged into SOURCE",
    )
    return {"runs": runs, "checkpoints": checkpoints}
