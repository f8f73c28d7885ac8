"""A sample request in the decode loop (`Job`) and each of its sequences (`Row`): what the
sampler (`sampler.py`) and the token chooser (`choose.py`) both read."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinkerd.engine.sampling.spec import SampleSpec
from tinkerd.types import SampledSequence


@dataclass(eq=False)
class Job:
    spec: SampleSpec
    future: Future
    generator: torch.Generator | None
    sequences: list[SampledSequence | None]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list | None = None
    remaining: int = 0
    admitted: float = 0.0  # unix seconds its prefill started
    first_token: float | None = None  # unix seconds its first token was chosen
    sampled: int = 0  # tokens chosen so far, over its samples


@dataclass(eq=False)
class Row:
    job: Job
    index: int  # which of the job's samples
    position: int  # position id of its first sampled token (the prompt's length)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list = field(default_factory=list)


@dataclass(eq=False)
class Parked:
    """Rows set aside from the running batch (a light tenant is active, `Sampler`), with
    everything the batch held for them, to be merged back as they were."""

    rows: list[Row]
    cache: Any  # a transformers cache of just these rows (`kv_cache.take_rows`)
    mask: Tensor  # [rows, columns]
    positions: Tensor  # [rows, 1]
    deltas: Tensor | None  # [rows] (vision models)
    next_logits: Tensor  # [rows, vocab]
