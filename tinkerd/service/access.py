"""Training runs and checkpoints as the REST API shows them, scoped to an API key.

The one place that decides what a key may read or change, used by the server's routes,
by load_state / create_sampling_client / weights_info, and (with no key: everything) by
the local RestClient that works on a data directory without a server:
- a key sees and changes only the runs it created and their checkpoints;
- a *published* checkpoint may also be read by any key (weights_info, load_state,
  create_sampling_client, archive download), never deleted or unpublished by it;
- anything else looks absent (404), whether or not it exists.
Published flags live in the SQLite store (table `published`), not in the checkpoint's
files: a checkpoint directory is written once and checksummed, and publishing is a
statement about access, not about the weights.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import secrets
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tinkerd.engine.checkpoint_format import CONFIG_FILE, WEIGHTS_FILE, read_verified
from tinkerd.engine.checkpoints import CheckpointInfo, CheckpointStore
from tinkerd.errors import InvalidRequestError, NotFoundError
from tinkerd.paths import parse_tinker_path
from tinkerd.service.store import Store
from tinkerd.types import Checkpoint, CheckpointsListResponse, Cursor, TrainingRun

ARCHIVE_URL_SECONDS = 15 * 60
"""How long a signed archive URL stays valid (unless revoked sooner: `Catalog.signature`)."""
EXTERNAL_FILES = (WEIGHTS_FILE, CONFIG_FILE)
"""What an external weights checkpoint offers for download: the PEFT adapter, as
`PeftModel.from_pretrained` reads it (tinkerd's own metadata stays behind)."""
AGE_SUFFIX = ".age"
MAX_AGE_RECIPIENTS = 10
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
"""The longest checkpoint TTL, 10 years (as Tinker documents): an expiry stays a date."""
LOCAL = "local"
"""The owner recorded for what is published without a key (local access to the data dir)."""

LiveRuns = Callable[[], dict[str, tuple[str, int]]]
"""Runs alive in this process that the store may not know: {model_id: (base_model, rank)}."""


def _utc(timestamp: float) -> datetime.datetime:
    # Clamped: an expiry stored before TTLs were bounded must not fail every listing.
    timestamp = min(timestamp, time.time() + MAX_TTL_SECONDS)
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)


def check_ttl(ttl_seconds: int | None) -> None:
    """A TTL is null (keep) or 1 s .. MAX_TTL_SECONDS; anything else is a 400 naming it."""
    if ttl_seconds is not None and not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidRequestError(
            f"ttl_seconds must be null or in [1, {MAX_TTL_SECONDS}] (10 years), "
            f"got {str(ttl_seconds)[:40]}"
        )


def checkpoint_path(training_run_id: str, checkpoint_id: str) -> str:
    """The tinker path of `checkpoint_id` ("weights/<name>" or "sampler_weights/<name>")."""
    path = f"tinker://{training_run_id}/{checkpoint_id}"
    parse_tinker_path(path)  # a malformed id is a 400 naming it
    return path


class Catalog:
    """Runs and checkpoints by API-key owner (a fingerprint; None: local, sees all)."""

    def __init__(self, store: Store, checkpoints: CheckpointStore, live_runs: LiveRuns = dict):
        self.store = store
        self.checkpoints = checkpoints
        self.live_runs = live_runs
        self._secret = secrets.token_bytes(32)  # signed URLs die with the process

    # ---------------------------------------------------------------- access

    def _may_change(self, model_id: str, who: str | None) -> bool:
        return who is None or self.store.run_owner(model_id) == who

    def readable(self, path: str, who: str | None) -> CheckpointInfo:
        """The checkpoint at `path` if `who` may read it: its own run's, or published."""
        self.expire()
        model_id = parse_tinker_path(path)[0]
        if not self._may_change(model_id, who) and path not in self.store.published():
            raise NotFoundError(f"no checkpoint {path}")
        return self.checkpoints.resolve(path)

    def owned(self, path: str, who: str | None) -> CheckpointInfo:
        """The checkpoint at `path` if `who` may change it (delete, publish)."""
        if not self._may_change(parse_tinker_path(path)[0], who):
            raise NotFoundError(f"no checkpoint {path}")
        return self.checkpoints.resolve(path)

    # ---------------------------------------------------------------- runs

    def _runs(self, who: str | None) -> dict[str, dict]:
        """Runs `who` owns by model_id (local: every run the store, the checkpoints or
        this process know of)."""
        runs = {r["model_id"]: r for r in self.store.runs(who)}
        if who is not None:
            return runs
        for model_id, (base_model, rank) in self.live_runs().items():
            runs.setdefault(model_id, _run(model_id, base_model, rank, time.time()))
        for info in self.checkpoints.list():
            run = runs.setdefault(
                info.model_id, _run(info.model_id, info.base_model, info.lora_rank, 0.0)
            )
            run["last_request"] = max(run["last_request"], info.created_at)
        return runs

    def _shared_runs(self) -> dict[str, dict]:
        """Runs of any owner with at least one published checkpoint."""
        ids = {parse_tinker_path(p)[0] for p in self.store.published()}
        return {r["model_id"]: r for r in self.store.runs(None) if r["model_id"] in ids}

    def _training_run(self, run: dict, who: str | None) -> TrainingRun:
        visible = self._checkpoints(run["model_id"], who)
        latest = {c.checkpoint_type: c for c in sorted(visible, key=lambda c: c.time)}
        mine = who is None or run["owner"] == who
        return TrainingRun(
            training_run_id=run["model_id"],
            base_model=run["base_model"],
            model_owner=run["owner"] if mine else "another key",
            is_lora=True,
            lora_rank=run["lora_config"].get("rank"),
            last_request_time=_utc(run["last_request"]),
            last_checkpoint=latest.get("training"),
            last_sampler_checkpoint=latest.get("sampler"),
            user_metadata={k: str(v) for k, v in (run.get("user_metadata") or {}).items()},
        )

    def list_runs(
        self, who: str | None, limit: int = 20, offset: int = 0, accessible: bool = False
    ) -> tuple[list[TrainingRun], Cursor]:
        """A page of runs, oldest first: the owner's, plus (`accessible`) those of others
        with a published checkpoint."""
        _check_page(limit, offset)
        runs = self._runs(who)
        if accessible and who is not None:
            runs = self._shared_runs() | runs
        ordered = sorted(runs.values(), key=lambda r: (r.get("created", 0.0), r["model_id"]))
        page = [self._training_run(r, who) for r in ordered[offset : offset + limit]]
        return page, Cursor(offset=offset, limit=limit, total_count=len(ordered))

    def get_run(self, model_id: str, who: str | None, accessible: bool = False) -> TrainingRun:
        run = self._runs(who).get(model_id)
        if run is None and accessible and who is not None:
            run = self._shared_runs().get(model_id)
        if run is None:
            raise NotFoundError(f"no training run {model_id!r}")
        return self._training_run(run, who)

    # ---------------------------------------------------------------- checkpoints

    def _checkpoints(self, model_id: str | None, who: str | None) -> list[Checkpoint]:
        """Checkpoints (of one run, or all) that `who` may read, oldest first."""
        expiries = self.expire()
        published = self.store.published()
        owners = {r["model_id"] for r in self.store.runs(who)} if who is not None else None
        found = [
            info.as_checkpoint(public=info.tinker_path in published)
            for info in self.checkpoints.list(model_id)
            if owners is None or info.model_id in owners or info.tinker_path in published
        ]
        for checkpoint in found:
            if checkpoint.tinker_path in expiries:
                checkpoint.expires_at = _utc(expiries[checkpoint.tinker_path])
        return found

    def list_checkpoints(self, model_id: str, who: str | None) -> CheckpointsListResponse:
        """A run's checkpoints: all of them for its owner, the published ones for others
        (404 if there are none: the run looks absent)."""
        found = self._checkpoints(model_id, who)
        if not found and model_id not in self._runs(who):
            raise NotFoundError(f"no training run {model_id!r}")
        return CheckpointsListResponse(checkpoints=found)

    def list_user_checkpoints(
        self, who: str | None, limit: int = 100, offset: int = 0
    ) -> CheckpointsListResponse:
        """Checkpoints of every run `who` owns, newest first."""
        _check_page(limit, offset)
        runs = self._runs(who)
        mine = [c for c in self._checkpoints(None, who) if _run_id(c) in runs]
        mine.reverse()
        cursor = Cursor(offset=offset, limit=limit, total_count=len(mine))
        return CheckpointsListResponse(checkpoints=mine[offset : offset + limit], cursor=cursor)

    def delete(self, path: str, who: str | None) -> None:
        info = self.owned(path, who)
        self.checkpoints.delete(info.model_id, info.kind, info.name)
        self.store.set_published(path, "", False)
        self.store.set_expiry(path, None)

    def set_ttl(self, path: str, who: str | None, ttl_seconds: int | None) -> None:
        """Delete the checkpoint `ttl_seconds` from now (None: keep it)."""
        self.owned(path, who)
        check_ttl(ttl_seconds)
        expires = None if ttl_seconds is None else time.time() + ttl_seconds
        self.store.set_expiry(path, expires)

    def expire(self) -> dict[str, float]:
        """Delete the checkpoints whose TTL has passed; returns the expiries still ahead.
        Called before every read and listing, so an expired checkpoint is never served."""
        expiries, now = self.store.expiries(), time.time()
        for path in [p for p, t in expiries.items() if t <= now]:
            with contextlib.suppress(NotFoundError):
                model_id, kind, name = parse_tinker_path(path)
                self.checkpoints.delete(model_id, kind, name)
            self.store.set_published(path, "", False)
            self.store.set_expiry(path, None)
            del expiries[path]
        return expiries

    def set_public(self, path: str, who: str | None, public: bool) -> None:
        """Publish or unpublish. Idempotent: the official SDK retries a 409 for minutes,
        so publishing what is public (or the reverse) succeeds and changes nothing."""
        self.owned(path, who)
        self.store.set_published(path, who or LOCAL, public)

    # ---------------------------------------------------------------- archives

    def signature(self, path: str, expires: int, part: str = "") -> str:
        """Signs the checkpoint's path, `part` (one of its files, for external weights), the
        expiry and what the link was granted on: the checkpoint's identity (its creation
        time: a deleted and re-created checkpoint is another) and whether it is published.
        A change to either revokes every link at once."""
        try:
            created = repr(self.checkpoints.resolve(path).created_at)
        except NotFoundError:
            created = "absent"
        public = path in self.store.published()
        message = f"{path}\n{part}\n{expires}\n{created}\n{public}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, path: str) -> tuple[int, str]:
        """(expires as unix seconds, signature) of a short-lived download of `path`."""
        expires = int(time.time()) + ARCHIVE_URL_SECONDS
        return expires, self.signature(path, expires)

    def check_signature(self, path: str, expires: int, signature: str) -> CheckpointInfo:
        self.expire()  # a checkpoint past its TTL is gone, and so is its link
        # As bytes: compare_digest refuses a str that is not ASCII (a forged signature).
        good = hmac.compare_digest(self.signature(path, expires).encode(), signature.encode())
        if not good or expires < time.time():
            raise NotFoundError(
                "the download link is invalid, has expired, or was revoked (the checkpoint "
                "was unpublished, published, deleted or re-created); ask for a new one"
            )
        return self.checkpoints.resolve(path)

    def _external_files(self, path: str) -> list[str]:
        """Download names of an external weights checkpoint's files (`.age` if encrypted)."""
        suffix = AGE_SUFFIX if self.store.age_recipients(path) else ""
        return [f + suffix for f in EXTERNAL_FILES]

    def sign_external(self, path: str, who: str | None) -> tuple[int, dict[str, str]]:
        """(expires, {file name: signature}) for downloading each file of the external
        weights checkpoint at `path` (which `who` must be able to read)."""
        self.readable(path, who)
        if parse_tinker_path(path)[1] != "external_weights":
            raise InvalidRequestError(f"{path} is not an external_weights checkpoint")
        expires = int(time.time()) + ARCHIVE_URL_SECONDS
        files = self._external_files(path)
        return expires, {f: self.signature(path, expires, f) for f in files}

    def external_file(self, path: str, filename: str, expires: int, signature: str) -> bytes:
        """One file of an external weights checkpoint, if the signature is good (checked
        against the sha256 recorded when it was saved; age-encrypted as it goes out if the
        export asked for it)."""
        # As bytes: compare_digest refuses a str that is not ASCII (a forged signature).
        good = hmac.compare_digest(
            self.signature(path, expires, filename).encode(), signature.encode()
        )
        if not good or expires < time.time() or filename not in self._external_files(path):
            raise NotFoundError("the download link is invalid or has expired; ask for a new one")
        self.expire()
        data = read_verified(self.checkpoints.resolve(path).path, filename.removesuffix(AGE_SUFFIX))
        recipients = self.store.age_recipients(path)
        return age_encrypt(data, recipients) if recipients else data


def _run(model_id: str, base_model: str, rank: int, last_request: float) -> dict:
    return {
        "model_id": model_id,
        "owner": LOCAL,
        "base_model": base_model,
        "lora_config": {"rank": rank},
        "created": last_request,
        "last_request": last_request,
        "user_metadata": {},
    }


def _run_id(checkpoint: Checkpoint) -> str:
    return parse_tinker_path(checkpoint.tinker_path)[0]


def _check_page(limit: int, offset: int) -> None:
    if limit < 1 or offset < 0:
        raise InvalidRequestError(f"limit must be >= 1 and offset >= 0, got {limit}, {offset}")


def tar_stream(info: CheckpointInfo, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The checkpoint's files as an uncompressed tar (files at the archive's root), in
    chunks of at most `chunk_bytes`. Every file is opened before the first byte goes out,
    so a delete during the download cannot cut the archive short."""
    files = sorted(p for p in info.path.iterdir() if p.is_file())
    handles = [(p.name, p.open("rb"), p.stat()) for p in files]
    try:
        for name, handle, stat in handles:
            entry = tarfile.TarInfo(name)
            entry.size, entry.mtime, entry.mode = stat.st_size, int(stat.st_mtime), 0o644
            yield entry.tobuf(format=tarfile.PAX_FORMAT)
            while chunk := handle.read(chunk_bytes):
                yield chunk
            yield b"\0" * (-stat.st_size % tarfile.BLOCKSIZE)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end of archive
    finally:
        for _, handle, _ in handles:
            handle.close()


def extract_checkpoint(tar_path: Path, tinker_path: str, out_dir: Path) -> Path:
    """Unpack a downloaded checkpoint archive into `out_dir` (absent or empty), after
    checking every file against the sha256 its tinkerd.json records; returns out_dir."""
    model_id, kind, name = parse_tinker_path(tinker_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidRequestError(f"{out_dir} exists and is not an empty directory")
    staging_root = out_dir.parent / f".{out_dir.name}.download-{secrets.token_hex(4)}"
    staging = staging_root / model_id / kind / name
    staging.mkdir(parents=True)
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(staging, filter="data")  # refuses absolute paths and '..'
        store = CheckpointStore(staging_root, recover=False)
        store.verify(store.get(model_id, kind, name))
        if out_dir.exists():
            out_dir.rmdir()
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return out_dir


def _age_recipients(keys: list[str]) -> list:
    if not keys:
        return []
    try:
        import pyrage  # optional: only encrypted exports need it
    except ImportError:
        raise InvalidRequestError(
            "age_encryption_recipients needs the `pyrage` package on the server "
            "(pip install pyrage)"
        ) from None
    if len(keys) > MAX_AGE_RECIPIENTS:
        raise InvalidRequestError(f"at most {MAX_AGE_RECIPIENTS} age recipients, got {len(keys)}")
    parsed = []
    for key in keys:
        kind = pyrage.x25519 if key.startswith("age1") else pyrage.ssh
        try:
            parsed.append(kind.Recipient.from_str(key))
        except Exception as e:  # pyrage.RecipientError, or a key of no known kind
            raise InvalidRequestError(f"invalid age recipient {key[:24]!r}...: {e}") from None
    return parsed


def check_age_recipients(keys: list[str]) -> None:
    """Raise InvalidRequestError unless every key is a native age1... or SSH public key."""
    _age_recipients(keys)


def age_encrypt(data: bytes, keys: list[str]) -> bytes:
    """`data` encrypted to every recipient (the age format, as `age -d` reads it)."""
    import pyrage

    return pyrage.encrypt(data, _age_recipients(keys))
