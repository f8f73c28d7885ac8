"""Streaming on loopback: when does the first chunk of a `stream=true` answer arrive?

One OpenAI-compatible Completions request with `stream=true` (the official `openai`
client) for `--tokens` new tokens on `--model` (default SmolLM2-135M), timed from the
request to its first text chunk and to its last; a chat stream through the official
`anthropic` client the same way. The sampler hands each token to the stream as it makes
it, so the first chunk should come after the prefill and one decode step: a small
fraction of the whole. Records a section in docs/benchmarks.md.

    python benchmarks/streaming.py [--model smollm2] [--tokens 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import anthropic
import openai
from _report import record
from train_overhead import BENCH_KEY, tinkerd_server

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def openai_stream(client, model: str, tokens: int, seed: int) -> tuple[float, float, int]:
    """(seconds to the first text chunk, seconds to the end, text chunks)."""
    start, first, chunks = time.perf_counter(), None, 0
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=tokens, temperature=1.0, seed=seed, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter() - start
            chunks += 1
    return first or 0.0, time.perf_counter() - start, chunks


def anthropic_stream(client, model: str, tokens: int) -> tuple[float, float, int]:
    start, first, chunks = time.perf_counter(), None, 0
    messages = [{"role": "user", "content": "Tell me a long story about the sea."}]
    with client.messages.stream(model=model, max_tokens=tokens, messages=messages) as s:
        for text in s.text_stream:
            if text:
                first = first or time.perf_counter() - start
                chunks += 1
    return first or 0.0, time.perf_counter() - start, chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tinkerd_server(args.model) as url:
        oai = openai.OpenAI(base_url=f"{url}/oai/api/v1", api_key=BENCH_KEY, max_retries=0)
        claude = anthropic.Anthropic(base_url=f"{url}/anthropic/api", api_key=BENCH_KEY)
        openai_stream(oai, args.model, 8, 0)  # warm up
        rows = []
        for r in range(args.rounds):
            rows.append(("OpenAI Completions", *openai_stream(oai, args.model, args.tokens, r)))
            rows.append(("Anthropic Messages", *anthropic_stream(claude, args.model, args.tokens)))
    lines = [
        "| stream | first chunk | whole answer | first / whole | text chunks |",
        "|---|---|---|---|---|",
    ]
    for api in ("OpenAI Completions", "Anthropic Messages"):
        mine = [r for r in rows if r[0] == api]
        first = statistics.median(r[1] for r in mine)
        whole = statistics.median(r[2] for r in mine)
        share = statistics.median(r[1] / r[2] for r in mine)
        chunks = statistics.median(r[3] for r in mine)
        lines.append(f"| {api} | {first:.2f} s | {whole:.2f} s | **{share:.1%}** | {chunks:.0f} |")
    body = f"""`benchmarks/streaming.py --model {args.model} --tokens {args.tokens} --rounds \
{args.rounds}`: one `stream=true` request at a time (up to {args.tokens} new tokens;
EOS may end one sooner), medians of {args.rounds} rounds.

""" + "\n".join(lines)
    print(body)
    record(f"Streaming: time to first chunk ({args.model})", body)


if __name__ == "__main__":
    main()
