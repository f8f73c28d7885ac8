"""ServiceClient: the entry point. With no base URL it runs the engine in-process."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tinkerd.client.futures import APIFuture, failed
from tinkerd.client.sampling_client import SamplingClient, open_sampler
from tinkerd.client.training_client import TrainingClient
from tinkerd.client.transport import InProcessTransport, Transport
from tinkerd.errors import InvalidRequestError
from tinkerd.requests import (
    CreateCustomLossRequest,
    CreateModelFromStateRequest,
    CreateModelRequest,
    GetServerCapabilitiesRequest,
    WeightsInfoRequest,
)
from tinkerd.types import GetServerCapabilitiesResponse, LoraConfig, optimizer_config_from

if TYPE_CHECKING:
    from tinkerd.client.rest_client import RestClient
    from tinkerd.client.traced_loss import LossHandle


class ServiceClient:
    """Creates training clients.

    `ServiceClient()` runs an embedded engine in this process (shared by every embedded
    client, so a base model is loaded once). `ServiceClient(base_url=...)` (or the env
    var `TINKERD_BASE_URL`) talks to a server over HTTP. A custom `transport` may be given.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: Transport | None = None,
        **_: Any,
    ):
        base_url = base_url or os.environ.get("TINKERD_BASE_URL")
        if transport is not None:
            self._transport = transport
        elif base_url:
            from tinkerd.client.http_transport import HttpTransport

            self._transport = HttpTransport(base_url, api_key or os.environ.get("TINKER_API_KEY"))
        else:
            self._transport = InProcessTransport()

    @property
    def transport(self) -> Transport:
        return self._transport

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        return self._transport.submit(GetServerCapabilitiesRequest()).result()

    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        return await APIFuture(self._transport.submit(GetServerCapabilitiesRequest()))

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: Any = None,
    ) -> TrainingClient:
        """A new LoRA run on `base_model` (loaded once and shared with other runs), trained
        with `optimizer` for its whole life: AdamOptimizerConfig (the default) or
        DimuonOptimizerConfig (ours or the official SDK's)."""
        optimizer_config = None if optimizer is None else optimizer_config_from(optimizer)
        lora = LoraConfig(
            rank=rank,
            seed=seed,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
        )
        request = CreateModelRequest(
            base_model=base_model,
            lora_config=lora,
            user_metadata=user_metadata,
            optimizer_config=optimizer_config,
        )
        model_id = self._transport.submit(request).result().model_id
        return TrainingClient(self._transport, model_id, base_model, lora)

    async def create_lora_training_client_async(self, *args: Any, **kwargs: Any) -> TrainingClient:
        import asyncio

        return await asyncio.to_thread(self.create_lora_training_client, *args, **kwargs)

    def create_training_client_from_state(
        self,
        path: str,
        user_metadata: dict[str, str] | None = None,
        *,
        optimizer: Any = None,
        **_: Any,
    ) -> TrainingClient:
        """A new run shaped like the checkpoint at `path` (base model, rank, train_* flags)
        with its weights; the optimizer (`optimizer`, default AdamW) starts afresh."""
        optimizer_config = None if optimizer is None else optimizer_config_from(optimizer)
        return self._from_state(path, with_optimizer=False, optimizer_config=optimizer_config)

    def create_training_client_from_state_with_optimizer(
        self, path: str, user_metadata: dict[str, str] | None = None, **_: Any
    ) -> TrainingClient:
        """Like `create_training_client_from_state`, with the checkpoint's optimizer and its
        state too: training continues exactly as if it had never stopped."""
        return self._from_state(path, with_optimizer=True)

    def _from_state(
        self, path: str, with_optimizer: bool, optimizer_config: Any = None
    ) -> TrainingClient:
        info = self._transport.submit(WeightsInfoRequest(tinker_path=path)).result()
        request = CreateModelFromStateRequest(
            path=path, optimizer=with_optimizer, optimizer_config=optimizer_config
        )
        model_id = self._transport.submit(request).result().model_id
        lora = LoraConfig(
            rank=info.lora_rank,
            train_mlp=info.train_mlp,
            train_attn=info.train_attn,
            train_unembed=info.train_unembed,
        )
        return TrainingClient(self._transport, model_id, info.base_model, lora)

    async def create_training_client_from_state_async(
        self, *args: Any, **kwargs: Any
    ) -> TrainingClient:
        import asyncio

        return await asyncio.to_thread(self.create_training_client_from_state, *args, **kwargs)

    async def create_training_client_from_state_with_optimizer_async(
        self, *args: Any, **kwargs: Any
    ) -> TrainingClient:
        import asyncio

        return await asyncio.to_thread(
            self.create_training_client_from_state_with_optimizer, *args, **kwargs
        )

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, **_: Any
    ) -> SamplingClient:
        """Sample from saved sampler weights (`tinker://...`) or from a base model as is.
        Given both, the weights are sampled and `base_model` must be theirs."""
        if model_path is None and base_model is None:
            raise InvalidRequestError("give model_path or base_model")
        return SamplingClient(
            self._transport, open_sampler(self._transport, base_model, model_path)
        )

    async def create_sampling_client_async(self, *args: Any, **kwargs: Any) -> SamplingClient:
        client = self.create_sampling_client(*args, **kwargs)
        await client._sampler  # type: ignore[misc]
        return client

    def create_custom_loss(self, fn: Any, input_ranks: Mapping[str, int]) -> APIFuture[LossHandle]:
        """Trace a per-datum loss `fn(logprobs, *inputs) -> (loss, metrics)` with torch.fx
        into a handle that runs inside the engine (uploaded, over HTTP). Pass the handle as
        forward_backward_custom's loss_fn or a RegularizerSpec's fn."""
        from tinkerd.client.traced_loss import trace  # lazy: torch.fx

        try:
            handle = trace(fn, input_ranks)
        except InvalidRequestError as e:
            return failed(e)
        request = CreateCustomLossRequest(graph=handle.request())

        def uploaded(answer: dict) -> LossHandle:
            handle.loss_id = answer["loss_id"]
            return handle

        return APIFuture(self._transport.submit(request)).then(uploaded)

    def create_rest_client(self) -> RestClient:
        """Training runs and checkpoints: this server's (scoped to the API key) over
        HTTP; embedded, the data directory's plus the runs of this client."""
        from tinkerd.client.rest_client import RestClient

        return RestClient(backend=self._transport.rest_backend())

    def close(self) -> None:
        self._transport.close()
