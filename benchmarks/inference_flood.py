"""Inference flood on loopback: one API key floods the OpenAI-compatible route while
another samples with the official SDK; how much slower are the victim's samples?

The victim (`SamplingClient.sample` on the base model, one request at a time, `--tokens`
new tokens) is timed alone, then while the flooder (another key) keeps `--flood-requests`
Completions requests of `--flood-prompts` prompts x `--flood-tokens` tokens in flight
(a request refused with 429, over its key's quota, is retried after 0.25 s), then alone again.
The sampler admits waiting requests by turns of key, with rows held back for a key that
has none running (engine/sampling/sampler.py), and the flood is admitted whole or not at
all per request (service/sampling.py), so the victim's request joins the batch at the
next step; and while the victim (a light key) is active the batch keeps to
`--sampling-latency-rows`, so its steps stay cheap. The flooder runs in a process of its
own (in this one its client threads would hold the victim's GIL). To tell the CPU the
flooder's client takes from what the server does, the victim is also timed beside
`--burners` processes that only spin (no flood). Reports p50 and p95 of each and their
ratios to alone (goal: within 2x), with the flood's token rate, and records a section in
docs/benchmarks.md.

    python benchmarks/inference_flood.py [--samples 20] [--flood-requests 8] [--burners 1]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time

import httpx
import openai
import tinker
from _report import record
from load import rss_mib
from tinker import types
from train_overhead import BENCH_KEY, tinkerd_server

FLOOD_KEY = "tml-inference-flooder"
TINY = "tinkerd/tiny"


def victim(sampler, samples: int, tokens: int) -> list[float]:
    """Seconds of each of `samples` sample requests made one after another."""
    prompt = types.ModelInput.from_ints([256, *b"the victim asks"])
    seconds = []
    for i in range(samples):
        params = types.SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, stop=[])
        start = time.perf_counter()
        sampler.sample(prompt, 1, params).result()
        seconds.append(time.perf_counter() - start)
    return seconds


def flood(url: str, args: argparse.Namespace, stop, counts) -> None:
    """Keep `--flood-requests` Completions requests in flight until `stop` (a process's
    Event); `counts`: shared [tokens, refused, reconnects, requests sent]."""
    client = openai.OpenAI(base_url=f"{url}/oai/api/v1", api_key=FLOOD_KEY, max_retries=0)
    prompts = [[256, *f"flood {i}".encode()] for i in range(args.flood_prompts)]

    def one() -> None:
        while not stop.is_set():
            counts[3] += 1
            try:
                out = client.completions.create(
                    model=TINY, prompt=prompts, max_tokens=args.flood_tokens, temperature=1.0
                )
                counts[0] += out.usage.completion_tokens
            except openai.RateLimitError:  # back off a little, as clients do on a 429
                counts[1] += 1
                time.sleep(0.25)
            except openai.APIConnectionError:  # a keep-alive connection closed as reused
                counts[2] += 1

    threads = [threading.Thread(target=one) for _ in range(args.flood_requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_until(predicate) -> None:
    """Until `predicate()`: a spawned process takes seconds to start on a loaded machine."""
    while not predicate():
        time.sleep(0.05)


def decoded(url: str) -> float:
    """Tokens the server's samplers have decoded so far (its /metrics)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {BENCH_KEY}"}).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tinkerd_sampler_decode_tokens_total")
    )


def burn(stop, started) -> None:
    """Spin until `stop`: a process that takes a core, as a flooder's client would."""
    with started.get_lock():
        started.value += 1
    while not stop.is_set():
        sum(range(10_000))


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--flood-requests", type=int, default=8)
    parser.add_argument("--flood-prompts", type=int, default=64)
    parser.add_argument("--flood-tokens", type=int, default=64)
    parser.add_argument("--burners", type=int, default=1)
    args = parser.parse_args()
    info: dict = {}
    with tinkerd_server(TINY, info, ("--api-key", FLOOD_KEY)) as url:
        sdk = tinker.ServiceClient(base_url=url, api_key=BENCH_KEY)
        sampler = sdk.create_sampling_client(base_model=TINY).result()
        victim(sampler, 3, args.tokens)  # warm up
        alone = victim(sampler, args.samples, args.tokens)
        mp = multiprocessing.get_context("spawn")  # not a fork of this threaded process
        stop, started = mp.Event(), mp.Value("i", 0)
        burners = [mp.Process(target=burn, args=(stop, started)) for _ in range(args.burners)]
        for b in burners:
            b.start()
        wait_until(lambda: started.value == args.burners)
        burned = victim(sampler, args.samples, args.tokens)
        stop.set()
        for b in burners:
            b.join()
        stop, counts = mp.Event(), mp.Array("l", 4)
        flooder = mp.Process(target=flood, args=(url, args, stop, counts))
        flooder.start()
        wait_until(lambda: counts[3] >= args.flood_requests)
        time.sleep(2.0)  # the flood fills the batch and the key's queue first
        started, tokens_before = time.perf_counter(), decoded(url)
        flooded = victim(sampler, args.samples, args.tokens)
        flood_seconds = time.perf_counter() - started
        tokens_during = decoded(url) - tokens_before
        time.sleep(1.5)  # the victim's linger passes: the flood alone
        started, tokens_before = time.perf_counter(), decoded(url)
        time.sleep(3.0)
        flood_alone = (decoded(url) - tokens_before) / (time.perf_counter() - started)
        stop.set()
        flooder.join()
        again = victim(sampler, args.samples, args.tokens)
        rss = rss_mib(info["pid"])
    base = alone + again
    p50, p95 = pct(base, 50), pct(base, 95)
    f50, f95 = pct(flooded, 50), pct(flooded, 95)
    b50, b95 = pct(burned, 50), pct(burned, 95)
    body = f"""`benchmarks/inference_flood.py --samples {args.samples} --flood-requests \
{args.flood_requests} --flood-prompts {args.flood_prompts} --flood-tokens {args.flood_tokens}`:
the victim's `SamplingClient.sample` ({args.tokens} tokens, official SDK) alone (before and
after the flood) and while another key keeps {args.flood_requests} Completions requests of
{args.flood_prompts} prompts x {args.flood_tokens} tokens in flight on the OpenAI route.

| victim | p50 | p95 |
|---|---|---|
| alone | {p50 * 1000:.0f} ms | {p95 * 1000:.0f} ms |
| beside {args.burners} spinning process(es), no flood | {b50 * 1000:.0f} ms | {b95 * 1000:.0f} ms |
| ratio | {b50 / p50:.2f}x | {b95 / p95:.2f}x |
| during the flood | {f50 * 1000:.0f} ms | {f95 * 1000:.0f} ms |
| ratio | **{f50 / p50:.2f}x** | **{f95 / p95:.2f}x** |

The server decoded {tokens_during / flood_seconds:.0f} tokens/s (nearly all the flood's) while
the victim sampled, and {flood_alone:.0f} tokens/s for the flood alone right after;
{counts[0]} flood tokens answered in all, {counts[1]} of {counts[3]} requests refused with 429
(the key's queue quota); server RSS after: {rss:.0f} MiB."""
    print(body)
    record("Inference flood (victim latency)", body)


if __name__ == "__main__":
    main()
