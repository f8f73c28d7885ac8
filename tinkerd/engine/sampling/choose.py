"""Choosing each row's next token: temperature, top-k/top-p, the noise, and logprobs.

Sampled-token logprobs come from the model's distribution at temperature 1 before any
top-k/top-p filtering: the number a training forward computes for that token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tinkerd.engine.sampling.jobs import Job, Row


@dataclass
class Plan:
    """What choosing tokens needs to know about the current rows, as tensors. Built when
    rows join or leave, not every step: the per-row Python work and host-to-device copies
    then happen once per batch change."""

    requests: int  # distinct requests among the rows
    sampled: Tensor | None  # rows with temperature > 0; None: all of them
    temps: Tensor | None  # [sampled, 1]; None: all 1, where dividing changes nothing
    top_k: Tensor | None  # [sampled]; None: no sampled row limits k
    top_p: Tensor | None  # [sampled]; None: no sampled row uses top-p
    unseeded: Tensor | None  # sampled rows drawing from the sampler's generator
    seeded: list[tuple[Job, Tensor, Tensor]]  # (job, its sampled rows, their sample indices)
    topk_logprobs: int  # most top-k sample logprobs any row asks for


def make_plan(rows: list[Row], vocab: int, device: torch.device) -> Plan:
    specs = [r.job.spec for r in rows]
    sampled = [i for i, s in enumerate(specs) if s.temperature > 0]
    sub = [specs[i] for i in sampled]

    def tensor(values: list, dtype=None) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    temps = tensor([s.temperature for s in sub])[:, None]
    top_k = tensor([min(s.top_k or vocab, vocab) for s in sub])
    top_p = tensor([s.top_p for s in sub])
    unseeded, seeded = [], {}
    for i, r in enumerate(rows[i] for i in sampled):
        if r.job.generator is None:
            unseeded.append(i)
        else:
            seeded.setdefault(r.job, []).append(i)
    return Plan(
        requests=len({id(r.job) for r in rows}),
        sampled=None if len(sampled) == len(rows) else tensor(sampled, torch.long),
        # decided on the float32 tensors, as the per-step arithmetic sees the values
        temps=None if bool((temps == 1).all()) else temps,
        top_k=top_k if bool((top_k < vocab).any()) else None,
        top_p=top_p if bool((top_p < 1).any()) else None,
        unseeded=tensor(unseeded, torch.long) if seeded and unseeded else None,
        seeded=[
            (job, tensor(idx, torch.long), tensor([rows[sampled[i]].index for i in idx]))
            for job, idx in seeded.items()
        ],
        topk_logprobs=max(s.topk_sample_logprobs for s in specs),
    )


def choose(logits: Tensor, plan: Plan, rng: torch.Generator) -> tuple[Tensor, Tensor, tuple | None]:
    """(token `[rows]`, its logprob `[rows]`, the top-k logprobs (values, indices) or None)
    for logits `[rows, vocab]` (float32): greedy at temperature 0, else the Gumbel-max
    trick on the top-k/top-p filtered, temperature-scaled logits. Unseeded rows draw
    their noise from `rng`."""
    logprobs_all = logits.log_softmax(-1)
    sampled = plan.sampled
    scores = logits if sampled is None else logits[sampled]
    if plan.temps is not None:
        scores = scores / plan.temps
    scores = filter_top_k_top_p(scores, plan.top_k, plan.top_p)
    if len(scores):
        # argmax(scores + Gumbel noise), the noise -log(-log(u)) computed in place
        noise = uniform_noise(plan, rng, len(scores), logits.shape[-1], logits.device)
        drawn = noise.log_().neg_().log_().neg_().add_(scores).argmax(-1)
    if sampled is None:
        choice = drawn
    else:
        choice = logits.argmax(-1)
        if len(sampled):
            choice[sampled] = drawn
    token_logprobs = logprobs_all.gather(1, choice[:, None]).squeeze(1)
    k = plan.topk_logprobs
    topk = logprobs_all.topk(k, -1) if k else None
    return choice, token_logprobs, topk


def uniform_noise(
    plan: Plan, rng: torch.Generator, rows: int, vocab: int, device: torch.device
) -> Tensor:
    """U(0,1) noise `[sampled rows, vocab]`. A seeded request draws noise for all its
    samples each step from its own generator, so its tokens do not depend on the batch."""
    if not plan.seeded:
        noise = torch.rand((rows, vocab), generator=rng, device=device)
    else:
        noise = torch.empty((rows, vocab), device=device)
        if plan.unseeded is not None:
            shape = (len(plan.unseeded), vocab)
            noise[plan.unseeded] = torch.rand(shape, generator=rng, device=device)
        for job, where, which in plan.seeded:
            shape = (job.spec.num_samples, vocab)
            noise[where] = torch.rand(shape, generator=job.generator, device=device)[which]
    return noise.clamp_(torch.finfo(noise.dtype).tiny, 1.0 - 1e-7)


def filter_top_k_top_p(scores: Tensor, ks: Tensor | None, ps: Tensor | None) -> Tensor:
    """Set to -inf every logit outside each row's top-k (`ks`, vocab: no limit) and top-p
    (`ps`) nucleus. None: no row uses that filter."""
    if ks is not None:
        kth = scores.topk(int(ks.max()), -1).values.gather(1, (ks - 1)[:, None])
        scores = scores.masked_fill(scores < kth, -math.inf)
    if ps is not None:
        ordered, order = scores.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs >= ps[:, None]  # mass before it already reaches p
        ordered = ordered.masked_fill(outside, -math.inf)
        scores = torch.full_like(scores, -math.inf).scatter(1, order, ordered)
    return scores


def next_token_logprobs(
    logits: Tensor, targets: list[int], k: int
) -> tuple[list[float], list | None]:
    """(the logprob of `targets[i]` under `logits[i]` (`[len(targets), vocab]`, float32);
    each position's top-k (token, logprob) pairs if k, else None)."""
    logprobs = logits.log_softmax(-1)
    index = torch.tensor(targets, device=logits.device)
    picked = logprobs.gather(1, index[:, None]).squeeze(1).tolist()
    if not k:
        return picked, None
    top = logprobs.topk(k, -1)
    return picked, [
        list(zip(ids, lps)) for ids, lps in zip(top.indices.tolist(), top.values.tolist())
    ]
