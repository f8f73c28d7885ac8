"""RestClient: training runs and checkpoints, with the official SDK's method names.

Every method returns an `APIFuture` at once (`.result()`, or `await` it); each also has
an `_async` twin that returns the result itself, as the official SDK's do. Over HTTP it
calls a server's REST routes, scoped to the API key; with no server it works on a data
directory directly and sees everything in it (as the owner of the files would).
"""

from __future__ import annotations

import email.utils
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from tinkerd.client.futures import APIFuture
from tinkerd.errors import error_for_status
from tinkerd.types import (
    CheckpointArchiveUrlResponse,
    CheckpointsListResponse,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)

API = "/api/v1"
Scope = Literal["owned", "accessible"]


def _parse(tinker_path: str) -> tuple[str, str, str]:
    """(model_id, kind, name) of `tinker://<model_id>/<kind>/<name>`."""
    from tinkerd.paths import parse_tinker_path

    return parse_tinker_path(tinker_path)


def _checkpoint_id(tinker_path: str) -> tuple[str, str]:
    """(training_run_id, checkpoint_id) of a tinker path, e.g. (run, "weights/name")."""
    model_id, kind, name = _parse(tinker_path)
    return model_id, f"{kind}/{name}"


class RestBackend(Protocol):
    """Where a RestClient's calls go: a server's REST routes, or a data directory."""

    def runs(self, limit: int, offset: int, scope: Scope) -> TrainingRunsResponse: ...
    def run(self, training_run_id: str, scope: Scope) -> TrainingRun: ...
    def weights_info(self, tinker_path: str) -> WeightsInfoResponse: ...
    def checkpoints(self, training_run_id: str) -> CheckpointsListResponse: ...
    def user_checkpoints(self, limit: int, offset: int) -> CheckpointsListResponse: ...
    def delete(self, tinker_path: str) -> None: ...
    def set_public(self, tinker_path: str, public: bool) -> None: ...
    def set_ttl(self, tinker_path: str, ttl_seconds: int | None) -> None: ...
    def archive_url(self, tinker_path: str) -> CheckpointArchiveUrlResponse: ...
    def fetch_archive(self, tinker_path: str, dest: Path) -> None: ...
    def close(self) -> None: ...


class HttpRest:
    """The server's REST routes (see tinkerd/server/rest.py)."""

    def __init__(self, http: httpx.Client):
        self.http = http

    def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        response = self.http.request(method, API + url, **kw)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise error_for_status(response.status_code, str(detail))
        return response

    def runs(self, limit: int, offset: int, scope: Scope) -> TrainingRunsResponse:
        params = {"limit": limit, "offset": offset, "access_scope": scope}
        return TrainingRunsResponse.model_validate(
            self._call("GET", "/training_runs", params=params).json()
        )

    def run(self, training_run_id: str, scope: Scope) -> TrainingRun:
        response = self._call(
            "GET", f"/training_runs/{training_run_id}", params={"access_scope": scope}
        )
        return TrainingRun.model_validate(response.json())

    def weights_info(self, tinker_path: str) -> WeightsInfoResponse:
        response = self._call("POST", "/weights_info", json={"tinker_path": tinker_path})
        return WeightsInfoResponse.model_validate(response.json())

    def checkpoints(self, training_run_id: str) -> CheckpointsListResponse:
        response = self._call("GET", f"/training_runs/{training_run_id}/checkpoints")
        return CheckpointsListResponse.model_validate(response.json())

    def user_checkpoints(self, limit: int, offset: int) -> CheckpointsListResponse:
        response = self._call("GET", "/checkpoints", params={"limit": limit, "offset": offset})
        return CheckpointsListResponse.model_validate(response.json())

    def delete(self, tinker_path: str) -> None:
        run, checkpoint = _checkpoint_id(tinker_path)
        self._call("DELETE", f"/training_runs/{run}/checkpoints/{checkpoint}")

    def set_public(self, tinker_path: str, public: bool) -> None:
        run, checkpoint = _checkpoint_id(tinker_path)
        url = f"/training_runs/{run}/checkpoints/{checkpoint}/publish"
        self._call("POST" if public else "DELETE", url)

    def set_ttl(self, tinker_path: str, ttl_seconds: int | None) -> None:
        run, checkpoint = _checkpoint_id(tinker_path)
        url = f"/training_runs/{run}/checkpoints/{checkpoint}/ttl"
        self._call("PUT", url, json={"ttl_seconds": ttl_seconds})

    def archive_url(self, tinker_path: str) -> CheckpointArchiveUrlResponse:
        run, checkpoint = _checkpoint_id(tinker_path)
        url = f"/training_runs/{run}/checkpoints/{checkpoint}/archive"
        response = self._call("GET", url, follow_redirects=False)
        return CheckpointArchiveUrlResponse(
            url=response.headers["location"],
            expires=email.utils.parsedate_to_datetime(response.headers["expires"]),
        )

    def fetch_archive(self, tinker_path: str, dest: Path) -> None:
        url = self.archive_url(tinker_path).url
        with httpx.stream("GET", url, timeout=60.0) as response:  # signed: no key needed
            if response.status_code >= 400:
                raise error_for_status(response.status_code, response.read().decode())
            with open(dest, "wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)

    def close(self) -> None:
        self.http.close()


class RestClient:
    """Training runs and checkpoints. `RestClient(base_url, api_key)` talks to a server
    (also `TINKERD_BASE_URL` / `TINKER_API_KEY`); with no URL it opens `data_dir`
    (default `$TINKERD_DATA_DIR` or `~/.tinkerd`). `ServiceClient.create_rest_client()`
    gives one on the service client's own transport."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        data_dir: Path | str | None = None,
        backend: RestBackend | None = None,
    ):
        base_url = base_url or os.environ.get("TINKERD_BASE_URL")
        if backend is not None:
            self._backend = backend
        elif base_url:
            api_key = api_key or os.environ.get("TINKER_API_KEY")
            headers = {"X-API-Key": api_key} if api_key else {}
            self._backend = HttpRest(
                httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=60.0)
            )
        else:
            from tinkerd.service.local_rest import LocalRest  # lazy: reads the store

            data_dir = data_dir or os.environ.get("TINKERD_DATA_DIR") or "~/.tinkerd"
            self._backend = LocalRest.open(data_dir)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tinkerd-rest")

    def _submit(self, fn: Any, *args: Any) -> APIFuture:
        return APIFuture(self._pool.submit(fn, *args))

    # ---------------------------------------------------------------- runs

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, access_scope: Scope = "owned"
    ) -> APIFuture[TrainingRunsResponse]:
        """A page of training runs, oldest first; `access_scope="accessible"` adds other
        keys' runs that have a published checkpoint."""
        return self._submit(self._backend.runs, limit, offset, access_scope)

    def get_training_run(
        self, training_run_id: str, access_scope: Scope = "owned"
    ) -> APIFuture[TrainingRun]:
        return self._submit(self._backend.run, training_run_id, access_scope)

    def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: Scope = "owned"
    ) -> APIFuture[TrainingRun]:
        run = _parse(tinker_path)[0]
        return self._submit(self._backend.run, run, access_scope)

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[WeightsInfoResponse]:
        return self._submit(self._backend.weights_info, tinker_path)

    # ---------------------------------------------------------------- checkpoints

    def list_checkpoints(self, training_run_id: str) -> APIFuture[CheckpointsListResponse]:
        """The run's checkpoints (training and sampler), oldest first."""
        return self._submit(self._backend.checkpoints, training_run_id)

    def list_user_checkpoints(
        self, limit: int = 100, offset: int = 0
    ) -> APIFuture[CheckpointsListResponse]:
        """A page of the checkpoints of every run of this key, newest first."""
        return self._submit(self._backend.user_checkpoints, limit, offset)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        """Delete `checkpoint_id` ("weights/<name>" or "sampler_weights/<name>")."""
        return self._submit(self._backend.delete, f"tinker://{training_run_id}/{checkpoint_id}")

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self._submit(self._backend.delete, tinker_path)

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Let every API key read the checkpoint (never delete it). Idempotent."""
        return self._submit(self._backend.set_public, tinker_path, True)

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self._submit(self._backend.set_public, tinker_path, False)

    def set_checkpoint_ttl_from_tinker_path(
        self, tinker_path: str, ttl_seconds: int | None
    ) -> APIFuture[None]:
        """Delete the checkpoint `ttl_seconds` from now (None: keep it for good)."""
        return self._submit(self._backend.set_ttl, tinker_path, ttl_seconds)

    def get_checkpoint_archive_url(
        self, training_run_id: str, checkpoint_id: str
    ) -> APIFuture[CheckpointArchiveUrlResponse]:
        """A short-lived URL that downloads the checkpoint directory as a tar (files at
        the root: a PEFT adapter directory once unpacked)."""
        path = f"tinker://{training_run_id}/{checkpoint_id}"
        return self._submit(self._backend.archive_url, path)

    def get_checkpoint_archive_url_from_tinker_path(
        self, tinker_path: str
    ) -> APIFuture[CheckpointArchiveUrlResponse]:
        return self._submit(self._backend.archive_url, tinker_path)

    def download_checkpoint(self, tinker_path: str, out_dir: Path | str) -> APIFuture[Path]:
        """Download and unpack the checkpoint into `out_dir` (absent or empty), every file
        checked against its recorded sha256; the future gives `out_dir`."""

        def download() -> Path:
            from tinkerd.service.access import extract_checkpoint  # checks every sha256

            out = Path(out_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                archive = Path(tmp) / "checkpoint.tar"
                self._backend.fetch_archive(tinker_path, archive)
                return extract_checkpoint(archive, tinker_path, out)

        return self._submit(download)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._backend.close()


def _async_twin(name: str) -> Any:
    async def twin(self: RestClient, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self, name)(*args, **kwargs)

    twin.__name__ = twin.__qualname__ = f"{name}_async"
    twin.__doc__ = f"`await`-able twin of `{name}`: returns the result itself."
    return twin


for _name in [n for n in vars(RestClient) if not n.startswith("_") and n != "close"]:
    setattr(RestClient, f"{_name}_async", _async_twin(_name))
