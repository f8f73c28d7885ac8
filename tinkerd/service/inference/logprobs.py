"""Token texts and bytes, and the two logprob formats: Chat Completions' per-token
entries and legacy Completions' parallel lists.

Logprobs are the sampler's: the log-probability of each token under the model at
temperature 1, before top-k/top-p, i.e. what `compute_logprobs` and a training forward
compute.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from tinkerd.service.inference.generate import Generation


def token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character map, inverted (byte-level BPE vocabularies use it)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer: Any, token: int) -> list[int]:
    """The token's own UTF-8 bytes: exact for byte-level BPE tokenizers (whose tokens may
    hold part of a character), else the bytes of its decoded text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
        piece = tokenizer.convert_ids_to_tokens(token)
        decoder = _byte_decoder()
        special = token in tokenizer.all_special_ids
        if piece is not None and not special and all(c in decoder for c in piece):
            return [decoder[c] for c in piece]
    return list(token_text(tokenizer, token).encode())


def chat_logprobs(tokenizer: Any, gen: Generation) -> dict:
    """OpenAI Chat's `choice.logprobs`: one entry per generated token."""

    def entry(token: int, logprob: float) -> dict:
        return {
            "token": token_text(tokenizer, token),
            "logprob": logprob,
            "bytes": token_bytes(tokenizer, token),
        }

    content = []
    for i, (token, logprob) in enumerate(zip(gen.tokens, gen.logprobs)):
        top = gen.topk[i] if gen.topk and gen.topk[i] else []
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]})
    return {"content": content, "refusal": None}


def completion_logprobs(
    tokenizer: Any,
    tokens: list[int],
    logprobs: list[float | None],
    topk: list | None,
    offsets: list[int],
) -> dict:
    """Legacy Completions `choice.logprobs`: tokens, token_logprobs, top_logprobs (a
    {token text: logprob} dict per position, None where there is none), text_offset.
    Tokens with the same text share a key, which keeps the larger logprob: harnesses
    read `max(top.values())` to tell whether a token was the greedy one."""
    top: list[dict[str, float] | None] = []
    for i in range(len(tokens)):
        entries = topk[i] if topk and i < len(topk) and topk[i] else None
        if entries is None:
            top.append(None)
            continue
        merged: dict[str, float] = {}
        for t, lp in entries:
            key = token_text(tokenizer, t)
            merged[key] = max(lp, merged.get(key, -math.inf))
        top.append(merged)
    return {
        "tokens": [token_text(tokenizer, t) for t in tokens],
        "token_logprobs": list(logprobs),
        "top_logprobs": top,
        "text_offset": offsets,
    }
