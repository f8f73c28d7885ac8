"""A data directory without a server, as a RestClient backend: its SQLite store and
checkpoints, unscoped (as the owner of the files would see them)."""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

from tinkerd.engine.checkpoints import CheckpointStore
from tinkerd.errors import NotFoundError
from tinkerd.service.access import ARCHIVE_URL_SECONDS, Catalog, LiveRuns, tar_stream
from tinkerd.service.store import Store
from tinkerd.types import (
    CheckpointArchiveUrlResponse,
    CheckpointsListResponse,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)


class LocalRest:
    """A data directory without a server: its SQLite store and checkpoints, unscoped."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    @classmethod
    def open(cls, data_dir: Path | str, live_runs: LiveRuns = dict) -> LocalRest:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise NotFoundError(f"no tinkerd data directory at {data_dir}")
        # recover=False: a server may be writing to this directory right now.
        store = CheckpointStore(data_dir / "checkpoints", recover=False)
        return cls(Catalog(Store(data_dir), store, live_runs))

    def runs(self, limit: int, offset: int, scope: str) -> TrainingRunsResponse:
        runs, cursor = self.catalog.list_runs(None, limit, offset)
        return TrainingRunsResponse(training_runs=runs, cursor=cursor)

    def run(self, training_run_id: str, scope: str) -> TrainingRun:
        return self.catalog.get_run(training_run_id, None)

    def weights_info(self, tinker_path: str) -> WeightsInfoResponse:
        return self.catalog.readable(tinker_path, None).weights_info()

    def checkpoints(self, training_run_id: str) -> CheckpointsListResponse:
        return self.catalog.list_checkpoints(training_run_id, None)

    def user_checkpoints(self, limit: int, offset: int) -> CheckpointsListResponse:
        return self.catalog.list_user_checkpoints(None, limit, offset)

    def delete(self, tinker_path: str) -> None:
        self.catalog.delete(tinker_path, None)

    def set_public(self, tinker_path: str, public: bool) -> None:
        self.catalog.set_public(tinker_path, None, public)

    def set_ttl(self, tinker_path: str, ttl_seconds: int | None) -> None:
        self.catalog.set_ttl(tinker_path, None, ttl_seconds)

    def archive_url(self, tinker_path: str) -> CheckpointArchiveUrlResponse:
        """A file:// URL of the archive, written to a temporary file."""
        fd, name = tempfile.mkstemp(prefix="tinkerd-checkpoint-", suffix=".tar")
        os.close(fd)
        self.fetch_archive(tinker_path, Path(name))
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=ARCHIVE_URL_SECONDS
        )
        return CheckpointArchiveUrlResponse(url=Path(name).as_uri(), expires=expires)

    def fetch_archive(self, tinker_path: str, dest: Path) -> None:
        info = self.catalog.readable(tinker_path, None)
        with open(dest, "wb") as f:
            for chunk in tar_stream(info):
                f.write(chunk)

    def close(self) -> None:
        pass
