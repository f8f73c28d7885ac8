"""Decode throughput of tinkerd's batched sampler against Hugging Face `generate`.

Same weights, prompts and lengths on both sides: prompts of 16-32 random tokens, every
sequence made to produce exactly `--max-tokens` tokens (tinkerd `stop=[]`; HF with
`min_new_tokens` = `max_new_tokens`), plain sampling at temperature 1 with no
top-k/top-p. HF `generate` decodes a left-padded batch with an attention mask; tinkerd
is measured as one request with `num_samples=N` (against HF on that prompt repeated N
times) and as N concurrent requests of one sample each (against HF on the N prompts),
and the latter again through a LoRA adapter (tinkerd sampler weights saved from a run;
HF on a PeftModel holding a copy of the same adapter). A bare forward loop (the model's
forward passes alone, greedy, no sampling) shows what any sampler must spend. tinkerd is
measured twice: its decode steps on the fast path (`tinkerd.engine.fast_decode`, where the
architecture has one) and on the HF forward (the same sampler with `fast_decode` off).
Throughput is generated tokens over wall time, prefill included. Timing alternates
between the three in rounds, so that machine drift hits all alike; the median is reported.

HF and the bare loop run in a helper process, tinkerd in this one, each with a single
thread that runs torch ops: PyTorch's OpenMP runtime (libgomp) keeps a thread team per
such thread, and once a process has more team threads than cores it stops spin-waiting,
which makes small ops about twice as slow for every thread there. The cost of that for
tinkerd (as when a training lane runs beside the sampler) is measured separately.

    python benchmarks/sampling.py [--model tinkerd/tiny | --family qwen3] [--sizes 1 8 32]
        [--max-tokens 128]

`--family` decodes a random model of that architecture with tinkerd/tiny's sizes and byte
tokenizer (`tinkerd.engine.tiny.write_tiny_family`; FAMILY_CONFIGS sets what it needs).
"""

from __future__ import annotations

import argparse
import inspect
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, record  # noqa: E402

from tinkerd.engine import Engine  # noqa: E402
from tinkerd.engine.adapters import snapshot_weights  # noqa: E402
from tinkerd.engine.models import resolve_model_path  # noqa: E402
from tinkerd.engine.tiny import write_tiny_family  # noqa: E402
from tinkerd.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams  # noqa: E402

Decode = Callable[[], int]  # runs one decode, returns how many tokens it generated
FAMILY_CONFIGS = {
    "qwen3": {},
    # Gemma 3's shape: 3 local layers (a 64-token window: sequences reach 160) per global
    # one, their own rope bases, a logit soft-cap; Gemma 2: softcaps and every other layer
    "gemma3_text": dict(
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        sliding_window=64,
        query_pre_attn_scalar=32,
        tie_word_embeddings=True,
        final_logit_softcapping=30.0,
    ),
    "gemma2": dict(sliding_window=64, query_pre_attn_scalar=32, tie_word_embeddings=True),
}
"""--family: config fields besides tinkerd/tiny's sizes (and the transformers defaults)."""


@dataclass
class Case:
    label: str
    sequences: int
    lora: bool
    hf_prompts: list[list[int]]  # the batch HF decodes
    prompts: list[list[int]]  # tinkerd's requests
    samples: int  # per tinkerd request


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 16-32 random token ids below 256 (valid ids in any vocabulary)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 33, (n,), generator=gen).tolist()
    return [torch.randint(0, 256, (k,), generator=gen).tolist() for k in lengths]


def load_hf(model_name: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name), dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def with_adapter(model: torch.nn.Module, config, weights: dict[str, torch.Tensor]):
    """An HF PeftModel on `model` with the adapter (as `snapshot_weights` gives it) active."""
    from peft import get_peft_model

    model = get_peft_model(model, config, adapter_name="default").eval()
    params = dict(model.named_parameters())
    for key, value in weights.items():
        params[key.format(name="default")].data.copy_(value)
    return model


def left_pad(model, prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask `[len(prompts), longest]`, on the model's device."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    return ids.to(device), mask.to(device)


def bare_decode(model, prompts: list[list[int]], max_tokens: int, pad: int) -> Decode:
    """The forward passes alone: a prefill, then one decode step per further token (greedy
    argmax, no sampling) on transformers' own cache. What any sampler on the model pays."""
    ids, mask = left_pad(model, prompts, pad)
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache_kw = (
        "cache" if "cache" in inspect.signature(plain.forward).parameters else "past_key_values"
    )

    def decode() -> int:
        with torch.inference_mode():
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            step_mask, position = mask, positions[:, -1:]
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
            for _ in range(max_tokens - 1):
                tokens = out.logits[:, -1:].argmax(-1)
                step_mask = torch.cat([step_mask, step_mask.new_ones((len(ids), 1))], 1)
                position = position + 1
                cache = {cache_kw: getattr(out, cache_kw)}
                out = model(
                    input_ids=tokens,
                    attention_mask=step_mask,
                    position_ids=position,
                    use_cache=True,
                    logits_to_keep=1,
                    **cache,
                )
        return len(ids) * max_tokens

    return decode


def hf_decode(model, prompts: list[list[int]], max_tokens: int, pad: int) -> Decode:
    ids, mask = left_pad(model, prompts, pad)
    width = ids.shape[1]

    def decode() -> int:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
            )
        return out[:, width:].numel()

    return decode


def tinkerd_decode(
    engine: Engine, weights, prompts: list[list[int]], samples: int, max_tokens: int
) -> Decode:
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[])

    def decode() -> int:
        futures = [engine.sample(weights, p, samples, params) for p in prompts]
        return sum(len(s.tokens) for f in futures for s in f.result().sequences)

    return decode


def tokens_per_second(decode: Decode, expected: int) -> float:
    start = time.perf_counter()
    produced = decode()
    elapsed = time.perf_counter() - start
    assert produced == expected, f"decoded {produced} tokens, expected {expected}"
    return produced / elapsed


def train_adapter(engine: Engine, model_name: str, prompt: list[int], rank: int) -> str:
    """A LoRA run with one optimizer step, so that its adapter is not the identity."""
    run_id = engine.create_model(model_name, LoraConfig(rank=rank, seed=0))
    datum = Datum(
        model_input=ModelInput.from_ints(prompt[:-1]),
        loss_fn_inputs={"target_tokens": prompt[1:], "weights": [1.0] * (len(prompt) - 1)},
    )
    engine.forward_backward(run_id, [datum])
    engine.optim_step(run_id, AdamParams(learning_rate=1e-2))
    return run_id


def hf_worker(
    conn, cases: list[Case], model: str, dtype, device: str, adapter: bytes | None, t: int, pad: int
):
    """The helper process: answers (case index, "bare" | "hf") with tokens/s."""
    plain = load_hf(model, dtype, device)
    lora = None
    if adapter:
        config, weights = torch.load(io.BytesIO(adapter), weights_only=False)
        lora = with_adapter(load_hf(model, dtype, device), config, weights)
    decoders = [
        {
            "bare": bare_decode(lora if c.lora else plain, c.hf_prompts, t, pad),
            "hf": hf_decode(lora if c.lora else plain, c.hf_prompts, t, pad),
        }
        for c in cases
    ]
    conn.send("ready")
    while (request := conn.recv()) is not None:
        i, name = request
        conn.send(tokens_per_second(decoders[i][name], cases[i].sequences * t))


def fast_decode(engine: Engine, base, on: bool) -> None:
    """Switch the base's sampler (made by the first request) to the fast path or off it."""
    engine.samplers.samplers[base.name].fast_decode = on


def fast_name(base) -> str:
    return f"model_type {base.model.config.model_type}"


def setup_tinkerd(args, prompts: list[list[int]]) -> dict:
    """The engine, its sampler weights, and a copy of the LoRA adapter for HF."""
    engine = Engine()
    base = engine.base_model(args.model)
    setup = dict(engine=engine, base=base, on_base=engine.sampler_for(base_model=args.model))
    setup["adapter"] = setup["on_lora"] = None
    if not args.no_lora:
        run_id = train_adapter(engine, args.model, prompts[0], args.rank)
        setup["on_lora"] = engine.save_weights_for_sampler(run_id, "bench")
        # as bytes: pickling tensors for the helper process would copy them into shared
        # memory with torch ops, on the main thread
        adapter = io.BytesIO()
        torch.save(snapshot_weights(engine.run(run_id)), adapter)
        setup["adapter"] = adapter.getvalue()
    return setup


def with_second_torch_thread(fn: Callable[[], float]) -> float:
    """fn() while another thread of this process holds an OpenMP team, as the training
    lane of `tinkerd serve` does beside the sampler."""
    done = threading.Event()

    def hold() -> None:
        torch.ones(1 << 22).add_(1)  # large enough to run in parallel: makes the team
        done.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        return fn()
    finally:
        done.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tinkerd/tiny", help="tinkerd/tiny or a local HF dir")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA rows")
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--family", choices=sorted(FAMILY_CONFIGS), help="a random model")
    args = parser.parse_args()
    t = args.max_tokens
    if args.family:
        args.model = tempfile.mkdtemp(prefix=f"tiny-{args.family}-")
        write_tiny_family(Path(args.model), args.family, **FAMILY_CONFIGS[args.family])

    # all setup compute on a thread that then exits, taking its OpenMP team with it: the
    # sampler's thread is left the only one here that runs torch ops
    prompts = make_prompts(max(args.sizes))
    with ThreadPoolExecutor(1) as pool:
        setup = pool.submit(setup_tinkerd, args, prompts).result()
    engine, base = setup["engine"], setup["base"]
    pad = base.tokenizer.pad_token_id or 0  # any id: padding is masked out

    cases = []
    for n in args.sizes:
        ps, many = prompts[:n], "s" if n > 1 else ""
        cases.append(Case(f"1 request x {n} sample{many}", n, False, [ps[0]] * n, ps[:1], n))
        if n > 1:
            cases.append(Case(f"{n} requests x 1 sample", n, False, ps, ps, 1))
        if not args.no_lora:
            cases.append(Case(f"{n} request{many} x 1 sample, LoRA", n, True, ps, ps, 1))
    ours = [
        tinkerd_decode(engine, setup["on_lora" if c.lora else "on_base"], c.prompts, c.samples, t)
        for c in cases
    ]

    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    helper = context.Process(
        target=hf_worker,
        args=(
            child,
            cases,
            args.model,
            base.model.dtype,
            str(base.device),
            setup["adapter"],
            t,
            pad,
        ),
        daemon=True,
    )
    helper.start()
    assert conn.recv() == "ready"

    def measure(i: int, name: str) -> float:
        if name.startswith("tinkerd"):
            if name == "tinkerd-hf":
                fast_decode(engine, base, False)
            try:
                return tokens_per_second(ours[i], cases[i].sequences * t)
            finally:
                fast_decode(engine, base, True)
        conn.send((i, name))
        return conn.recv()

    names = ("bare", "hf", "tinkerd", "tinkerd-hf")
    load_before = os.getloadavg()[0]
    for i in range(len(cases)):  # warm up
        for name in names:
            measure(i, name)
    rates = {(i, name): [] for i in range(len(cases)) for name in names}
    for _ in range(args.rounds):
        for i in range(len(cases)):
            for name in names:
                rates[i, name].append(measure(i, name))
    conn.send(None)
    helper.join()

    # the largest base-model case again, with a second torch thread in this process
    big = max((i for i, c in enumerate(cases) if not c.lora), key=lambda i: cases[i].sequences)
    shared = statistics.median(
        with_second_torch_thread(lambda: measure(big, "tinkerd")) for _ in range(args.rounds)
    )

    rows = [
        "| sequences | workload | bare forward loop tok/s | HF generate tok/s | tinkerd tok/s "
        "| tinkerd / HF | tinkerd on the HF forward tok/s | fast path / HF forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(cases):
        bare, hf, tinkerd, on_hf = (statistics.median(rates[i, name]) for name in names)
        rows.append(
            f"| {c.sequences} | {c.label} | {bare:,.0f} | {hf:,.0f} | {tinkerd:,.0f} "
            f"| {tinkerd / hf:.2f} | {on_hf:,.0f} | {tinkerd / on_hf:.2f} |"
        )
    alone = statistics.median(rates[big, "tinkerd"])
    second = (
        f"With a second thread running torch ops in tinkerd's process (as a training lane "
        f"does in `tinkerd serve`), {cases[big].label} gives {shared:,.0f} tok/s "
        f"({shared / alone:.2f}x its figure above): libgomp's spin-waiting changes with "
        "the process's thread count, for better or worse depending on the machine."
    )
    steps = engine.sampler_stats(args.model)
    load = f" (load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)"
    print(f"machine: {machine()}")
    model = f"a random {args.family} of tinkerd/tiny's sizes" if args.family else args.model
    fast = engine.samplers.samplers[base.name]._fast is not None
    print(f"model {model}, {t} new tokens per sequence, prompts of 16-32 tokens")
    print(f"fast decode path: {'yes' if fast else 'no'} ({fast_name(base)}){load}")
    most_rows, most_requests = max(r for r, _ in steps), max(j for _, j in steps)
    print(f"largest tinkerd batch: {most_rows} rows of {most_requests} requests")
    print("\n".join(rows))
    print(second)
    if not args.no_record:
        flags = " --no-lora" if args.no_lora else f" --rank {args.rank}"
        lora = (
            ""
            if args.no_lora
            else " Its base model also carries the LoRA run's adapter, as in a server that "
            f"trains. LoRA rows: sampler weights saved from a rank-{args.rank} run, against "
            "an HF PeftModel holding a copy of that adapter."
        )
        source = f"--family {args.family}" if args.family else f"--model {args.model}"
        title = args.family or ("" if args.model == "tinkerd/tiny" else args.model)
        on_hf = (
            "The last two columns: the same sampler with its decode steps on the HF forward "
            "instead of the fast path (`fast_decode` off), alternating with it in each round."
            if fast
            else f"{fast_name(base)} has no fast decode path: both tinkerd columns run the "
            "HF forward."
        )
        record(
            f"sampling ({title})" if title else "sampling",
            f"`python benchmarks/sampling.py {source} --max-tokens {t}{flags}`{load}: "
            f"generated tokens/s, prefill included, median of {args.rounds} rounds; every "
            f"sequence makes {t} tokens (no early stop) after a prompt of 16-32 random "
            "tokens; temperature 1, no top-k/top-p. HF is `model.generate(do_sample=True)` "
            "on a left-padded batch (N copies of the prompt for `1 request x N samples`). "
            "tinkerd is the embedded engine's batched sampler, unseeded, given one request "
            f"of N samples or N concurrent requests of one.{lora} The bare forward loop is "
            "the model's forward passes alone (prefill, then one step per token, greedy "
            "argmax, transformers' cache): what any sampler on this model pays. HF and the "
            "bare loop run in a helper process, tinkerd in the benchmark's own, each with "
            "one thread that runs torch ops: with more, PyTorch's OpenMP runtime (libgomp) "
            "stops spin-waiting in every thread of the process, which the last line "
            f"measures. {on_hf}\n\n" + "\n".join(rows) + "\n\n" + second,
        )


if __name__ == "__main__":
    main()
