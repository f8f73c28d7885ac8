"""Throughput of OpenAI-compatible chat against `SamplingClient`, on one `tinkerd serve`.

N concurrent Chat Completions requests (the official `openai` client, async) against the
same N prompts, rendered with the same chat template, sent concurrently through the
official `tinker` SDK's SamplingClient. Request i carries seed i on both sides, so both
produce the very same tokens (a seed fixes a sequence whatever shares the batch): the
work is identical and only the path differs. Both go into the same batched sampler. The
figure is generated tokens over the wall time of the whole burst; the two alternate in
rounds (ABBA order), and the median of each is reported with their ratio, and the median
of the per-round ratios.

    python benchmarks/openai_throughput.py [--requests 32] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import record  # noqa: E402

KEY = "tml-benchmark-key"
MODEL = "tinkerd/tiny-chat"


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tempfile.mkdtemp(prefix="tinkerd-bench-")
    args = [sys.executable, "-m", "tinkerd.cli", "serve", "--port", str(port)]
    args += ["--data-dir", data, "--api-key", KEY, "--model", model]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("tinkerd serve exited")
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("tinkerd serve did not start")


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question {i}: say something."}] for i in range(n)]


async def openai_burst(client, model: str, chats: list, max_tokens: int) -> int:
    async def one(i: int, messages: list) -> int:
        out = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=1.0, seed=i
        )
        return out.usage.completion_tokens

    return sum(await asyncio.gather(*(one(i, m) for i, m in enumerate(chats))))


async def sdk_burst(sampler, prompts: list, max_tokens: int) -> int:
    from tinker import types

    async def one(i: int, prompt: list[int]) -> int:
        params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i)
        out = await sampler.sample(types.ModelInput.from_ints(prompt), 1, params)
        return len(out.sequences[0].tokens)

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def measure(args: argparse.Namespace, url: str) -> dict[str, list[float]]:
    import openai
    import tinker

    from tinkerd.engine.tiny_chat import build_chat_tokenizer

    chats = conversations(args.requests)
    tokenizer = build_chat_tokenizer()  # tinkerd/tiny-chat's own template
    prompts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True)["input_ids"] for c in chats
    ]
    client = openai.AsyncOpenAI(base_url=f"{url}/oai/api/v1", api_key=KEY, max_retries=0)
    service = tinker.ServiceClient(base_url=url, api_key=KEY)
    sampler = await service.create_sampling_client_async(base_model=args.model)
    runs = {
        "openai chat": lambda: openai_burst(client, args.model, chats, args.max_tokens),
        "SamplingClient": lambda: sdk_burst(sampler, prompts, args.max_tokens),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        order = list(runs.items()) if round_ % 2 == 0 else list(runs.items())[::-1]
        for name, burst in order:  # ABBA: drift of a shared machine hits both alike
            start = time.perf_counter()
            tokens[name] = await burst()
            seconds = time.perf_counter() - start
            if round_:
                rates[name].append(tokens[name] / seconds)
            print(f"round {round_} {name}: {tokens[name]} tokens in {seconds:.2f}s", flush=True)
    assert len(set(tokens.values())) == 1, f"the two paths made different tokens: {tokens}"
    await client.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL, help="a served model with a chat template")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    proc, url = start_server(args.model)
    load_before = os.getloadavg()[0]
    try:
        rates = asyncio.run(measure(args, url))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = median["openai chat"] / median["SamplingClient"]
    paired = statistics.median(a / b for a, b in zip(rates["openai chat"], rates["SamplingClient"]))
    rows = ["| path | tokens/s (median) | rounds |", "|---|---|---|"]
    rows += [
        f"| {name} | {median[name]:.1f} | {', '.join(f'{r:.1f}' for r in rs)} |"
        for name, rs in rates.items()
    ]
    rows.append(
        f"\nratio openai chat / SamplingClient: **{ratio:.2f}x** of the medians, "
        f"{paired:.2f}x the median of each round's ratio ({load})"
    )
    print("\n".join(rows))
    if not args.no_record:
        record(
            f"openai_throughput ({args.model})",
            f"`python benchmarks/openai_throughput.py --requests {args.requests} --max-tokens "
            f"{args.max_tokens} --rounds {args.rounds}`: {args.requests} concurrent chat "
            "requests through the official `openai` client (AsyncOpenAI, "
            "`/oai/api/v1/chat/completions`) against the same prompts, rendered with the "
            "same template, through the official `tinker` SDK's SamplingClient "
            "(`await sample(...)`), on one `tinkerd serve`; request i has seed i on both "
            "sides, so both generate the same tokens. Aggregate generated tokens/s over "
            "each burst's wall time (clients, HTTP and the server on the same machine), "
            "median of the rounds after a warm-up.\n\n" + "\n".join(rows),
        )


if __name__ == "__main__":
    main()
