"""The sampler backend interface: what the engine needs from whatever decodes tokens.

The engine makes one backend per base model (`factory(base)`) and hands it validated
`SampleSpec`s. The built-in `tinkerd.engine.sampling.sampler.Sampler` (batched KV cache,
per-row LoRA, on the engine's own copy of the base) is the default;
`tinkerd.engine.vllm_sampler.VLLMSampler` decodes on a GPU with vLLM, loading each
adapter by path. `tinkerd serve --sampler NAME` picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tinkerd.errors import InvalidRequestError

if TYPE_CHECKING:  # the CLI reads SAMPLER_BACKENDS without loading torch
    from tinkerd.engine.models import BaseModel
    from tinkerd.engine.sampling.spec import SampleSpec


@runtime_checkable
class SamplerBackend(Protocol):
    def submit(self, spec: SampleSpec) -> Future:
        """Queue a validated request; the future resolves to a `SampleResponse` with the
        sampled tokens and each token's logprob (temperature 1, before top-k/top-p)."""

    def adapters_in_use(self) -> set[str]:
        """Adapter names that queued or running requests read (not to be unloaded)."""

    def recent_steps(self) -> list[tuple[int, int]]:
        """(rows, distinct requests) of each recent decode step, oldest first: how much
        was batched. Empty for a backend that does not see its steps."""

    def close(self) -> None:
        """Fail what is queued and release the backend's threads and memory."""


SamplerFactory = Callable[["BaseModel"], SamplerBackend]


def _builtin() -> SamplerFactory:
    from tinkerd.engine.sampling.sampler import Sampler

    return Sampler


def _vllm() -> SamplerFactory:
    from tinkerd.engine.vllm_sampler import VLLMSampler, check_vllm_available

    check_vllm_available()
    return VLLMSampler


SAMPLER_BACKENDS: dict[str, Callable[[], SamplerFactory]] = {"builtin": _builtin, "vllm": _vllm}
"""Each backend by name, loaded on first use: `tinkerd serve --sampler` offers these.
"vllm" needs `pip install tinkerd[vllm]` and a CUDA GPU."""


def sampler_factory(name: str) -> SamplerFactory:
    """The backend called `name` (`SAMPLER_BACKENDS`)."""
    load = SAMPLER_BACKENDS.get(name)
    if load is None:
        raise InvalidRequestError(
            f"unknown sampler backend {name!r}: use {' or '.join(SAMPLER_BACKENDS)}"
        )
    return load()
