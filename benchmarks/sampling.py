"""Decode throughput of tinkerd's batched sampler against Hugging Face `generate`.

Same weights, prompts and lengths on both sides: prompts of 16-32 random tokens, every
sequence made to produce exactly `--max-tokens` tokens (tinkerd `stop=[]`; HF with EOS
disabled), plain sampling at temperature 1 with no top-k/top-p. HF `generate` decodes a
left-padded batch with an attention mask; tinkerd is measured as one request with
`num_samples=N` (against HF on that prompt repeated N times) and as N concurrent
requests of one sample each (against HF on the N prompts), and the latter again through
a LoRA adapter (tinkerd sampler weights saved from a run; HF on a PeftModel holding a
copy of the same adapter). Throughput is generated tokens over wall time, prefill
included. Timing alternates between HF and tinkerd in rounds; the median is reported.

    python benchmarks/sampling.py [--model tinkerd/tiny] [--sizes 1 8 32] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, record  # noqa: E402

from tinkerd.engine.adapters import snapshot_weights  # noqa: E402
from tinkerd.engine.models import resolve_model_path  # noqa: E402
from tinkerd.engine.trainer import Engine  # noqa: E402
from tinkerd.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams  # noqa: E402

Decode = Callable[[], int]  # runs one decode, returns how many tokens it generated


def make_prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 33, (n,), generator=gen).tolist()
    return [torch.randint(0, min(vocab, 256), (k,), generator=gen).tolist() for k in lengths]


def load_hf(model_name: str, like: torch.nn.Module) -> torch.nn.Module:
    """A separate plain copy of the base model, same dtype and device as tinkerd's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name), dtype=like.dtype)
    return model.to(like.device).eval().requires_grad_(False)


def hf_with_adapter(model_name: str, like: torch.nn.Module, engine: Engine, run_id: str):
    """An HF PeftModel holding a copy of the run's adapter, active."""
    from peft import get_peft_model

    config, weights = snapshot_weights(engine.run(run_id))
    model = get_peft_model(load_hf(model_name, like), config, adapter_name="default").eval()
    params = dict(model.named_parameters())
    for key, value in weights.items():
        params[key.format(name="default")].data.copy_(value)
    return model


def hf_decode(model, prompts: list[list[int]], max_tokens: int, pad: int) -> Decode:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tinkerd/tiny", help="tinkerd/tiny or a local HF dir")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA rows")
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()

    engine = Engine()
    base = engine.base_model(args.model)
    pad = base.tokenizer.pad_token_id
    pad = pad if pad is not None else (next(iter(base.tokenizer.all_special_ids), 0))
    prompts = make_prompts(base.vocab_size, max(args.sizes))
    hf_plain = load_hf(args.model, base.model)
    on_base = engine.sampler_for(base_model=args.model)
    if not args.no_lora:
        run_id = train_adapter(engine, args.model, prompts[0], args.rank)
        on_lora = engine.save_weights_for_sampler(run_id, "bench")
        hf_lora = hf_with_adapter(args.model, base.model, engine, run_id)

    # (label, sequences, HF decode, tinkerd decode)
    cases: list[tuple[str, int, Decode, Decode]] = []
    t = args.max_tokens
    for n in args.sizes:
        ps = prompts[:n]
        cases.append(
            (
                f"1 request x {n} samples",
                n,
                hf_decode(hf_plain, [ps[0]] * n, t, pad),
                tinkerd_decode(engine, on_base, [ps[0]], n, t),
            )
        )
        if n > 1:
            cases.append(
                (
                    f"{n} requests x 1 sample",
                    n,
                    hf_decode(hf_plain, ps, t, pad),
                    tinkerd_decode(engine, on_base, ps, 1, t),
                )
            )
        if not args.no_lora:
            cases.append(
                (
                    f"{n} requests x 1 sample, LoRA r{args.rank}",
                    n,
                    hf_decode(hf_lora, ps, t, pad),
                    tinkerd_decode(engine, on_lora, ps, 1, t),
                )
            )

    for _, n, hf, ours in cases:  # warm up
        tokens_per_second(hf, n * t)
        tokens_per_second(ours, n * t)
    rates = {label: ([], []) for label, *_ in cases}
    for _ in range(args.rounds):
        for label, n, hf, ours in cases:
            rates[label][0].append(tokens_per_second(hf, n * t))
            rates[label][1].append(tokens_per_second(ours, n * t))

    steps = engine.sampler_stats(args.model)
    rows = [
        "| sequences | workload | HF generate tok/s | tinkerd tok/s | ratio |",
        "|---|---|---|---|---|",
    ]
    for label, n, *_ in cases:
        hf_rate, our_rate = (statistics.median(r) for r in rates[label])
        ratio = our_rate / hf_rate
        rows.append(f"| {n} | {label} | {hf_rate:,.0f} | {our_rate:,.0f} | {ratio:.2f} |")
    print(f"machine: {machine()}")
    print(f"model {args.model}, {t} new tokens per sequence, prompts of 16-32 tokens")
    most_rows, most_requests = max(r for r, _ in steps), max(j for _, j in steps)
    print(f"largest tinkerd batch: {most_rows} rows from {most_requests} requests")
    print("\n".join(rows))
    if not args.no_record:
        record(
            "sampling",
            f"`python benchmarks/sampling.py --model {args.model} --max-tokens {t}`: "
            f"generated tokens/s (prefill included), median of {args.rounds} rounds, "
            f"{t} new tokens per sequence (no early stop), prompts of 16-32 random tokens, "
            "temperature 1, no top-k/top-p. HF is `model.generate(do_sample=True)` on a "
            "left-padded batch; tinkerd is the embedded engine's batched sampler (unseeded), "
            "as one request with N samples or as N concurrent requests. LoRA rows: tinkerd "
            "sampler weights saved from a run vs an HF PeftModel with a copy of that adapter. "
            "ratio = tinkerd / HF.\n\n" + "\n".join(rows),
        )


if __name__ == "__main__":
    main()
