"""Peak memory (RSS) and speed of one forward_backward: tinkerd within a memory budget
against a bare PyTorch + PEFT step with transformers' defaults, each size in a fresh
process.

Both take the same step: LoRA rank 32 on every linear layer, summed token cross-entropy,
float32 base weights, a fixed batch of random tokens. Each child process loads the
model, warms up with one forward_backward of 32 tokens, then times one forward_backward
of the batch and reports its peak RSS (`ru_maxrss`, which includes the weights and the
Python runtime) and the RSS before the batch; MB a token is the growth over the RSS
before, per token. `--whole-logits` runs tinkerd without the chunked output layer (the
model's own `[tokens, vocab]` logits, as before issue 26), for the comparison.

    python benchmarks/memory.py [--model smollm2] [--sizes 4x512,4x1024,16x1024]
        [--budget 1.5GiB] [--bare-sizes 4x512,4x1024] [--whole-logits] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def tokens(vocab: int, batch: int, seq: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 20000), (batch, seq + 1), generator=gen)


def child_tinkerd(model: str, batch: int, seq: int, budget: str | None, whole: bool) -> dict:
    import torch

    from tinkerd.engine import Engine, EngineConfig, compute
    from tinkerd.types import Datum, LoraConfig, ModelInput

    if whole:  # the output layer as one `[tokens, vocab]` block (and the memory plan's
        compute.output_layer = lambda model: None  # estimate for it)
        compute.memory.output_layer = compute.output_layer

    config = EngineConfig(dtype="float32", memory_budget_bytes=budget)
    engine = Engine(extra_models=[model], config=config)
    model_id = engine.create_model(model, LoraConfig(rank=32, seed=0))

    def data(t: torch.Tensor) -> list[Datum]:
        return [
            Datum(
                model_input=ModelInput.from_ints(row[:-1].tolist()),
                loss_fn_inputs={
                    "target_tokens": row[1:].tolist(),
                    "weights": [1.0] * (len(row) - 1),
                },
            )
            for row in t
        ]

    vocab = engine.run(model_id).base.vocab_size
    engine.forward_backward(model_id, data(tokens(vocab, 1, 32, seed=1)))
    batch_data = data(tokens(vocab, batch, seq))
    before = rss_bytes()
    start = time.perf_counter()
    out = engine.forward_backward(model_id, batch_data)
    seconds = time.perf_counter() - start
    limits = engine.limits
    return {
        "loss": out.metrics["loss:sum"],
        "seconds": seconds,
        "rss_before": before,
        "peak_rss": peak_rss_bytes(),
        "budget": limits.memory_budget_bytes,
        "checkpoint": limits.for_pass(
            engine.run(model_id).base,
            engine._members(
                [engine.prepare(model_id, batch_data, "cross_entropy", None)],
                [engine.run(model_id)],
            ),
            True,
        ).checkpoint,
    }


def child_bare(model: str, batch: int, seq: int) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tinkerd.engine.adapters import LORA_ALPHA
    from tinkerd.engine.models import classify_linears, resolve_model_path

    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32)
    hf.eval().requires_grad_(False)
    targets = list(classify_linears(hf))
    peft = get_peft_model(hf, LoraConfig(r=32, lora_alpha=LORA_ALPHA, target_modules=targets))
    vocab = hf.get_input_embeddings().weight.shape[0]

    def step(t: torch.Tensor) -> float:
        logits = peft(input_ids=t[:, :-1]).logits
        labels = t[:, 1:].flatten()
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels, reduction="sum")
        loss.backward()
        return loss.item()

    step(tokens(vocab, 1, 32, seed=1))
    t = tokens(vocab, batch, seq)
    before = rss_bytes()
    start = time.perf_counter()
    loss = step(t)
    seconds = time.perf_counter() - start
    return {"loss": loss, "seconds": seconds, "rss_before": before, "peak_rss": peak_rss_bytes()}


def run_child(
    kind: str, model: str, batch: int, seq: int, budget: str | None, whole: bool = False
) -> dict:
    args = [sys.executable, __file__, "--child", kind, "--model", model]
    args += ["--sizes", f"{batch}x{seq}"] + (["--budget", budget] if budget else [])
    args += ["--whole-logits"] if whole else []
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sizes", default="4x512,4x1024,16x1024")
    parser.add_argument("--bare-sizes", default="4x512,4x1024")
    parser.add_argument("--budget", default="1.5GiB", help="tinkerd's --memory-budget")
    parser.add_argument("--child", choices=["tinkerd", "bare"])
    parser.add_argument("--whole-logits", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",") if s]
    if args.child:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        batch, seq = sizes[0]
        if args.child == "tinkerd":
            result = child_tinkerd(args.model, batch, seq, args.budget, args.whole_logits)
        else:
            result = child_bare(args.model, batch, seq)
        print(json.dumps(result))
        return
    bare_sizes = {s for s in args.bare_sizes.split(",") if s}
    rows = []
    for batch, seq in sizes:
        ours = run_child("tinkerd", args.model, batch, seq, args.budget, args.whole_logits)
        print(f"tinkerd {batch}x{seq}: {ours}", flush=True)
        bare = (
            run_child("bare", args.model, batch, seq, None)
            if f"{batch}x{seq}" in bare_sizes
            else {}
        )
        print(f"bare    {batch}x{seq}: {bare or 'not run'}", flush=True)
        rows.append((batch, seq, ours, bare))
    lines = [
        "| size | tinkerd peak RSS GB | tinkerd MB a token | tinkerd tokens/s | bare peak RSS GB "
        "| bare MB a token | bare tokens/s | tinkerd / bare time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, seq, ours, bare in rows:
        n = batch * seq
        cells = [f"{batch}x{seq}"]
        for r in (ours, bare):
            if "peak_rss" in r:
                per_token = (r["peak_rss"] - r["rss_before"]) / n / 1e6
                cells += [gb(r["peak_rss"]), f"{per_token:.3f}", f"{n / r['seconds']:.0f}"]
            else:
                cells += [r.get("error", "not run"), "-", "-"]
        ratio = (
            ours["seconds"] / bare["seconds"] if "seconds" in ours and "seconds" in bare else None
        )
        cells.append(f"{ratio:.2f}" if ratio else "-")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        from _report import record

        record(
            f"memory ({args.model}, float32)",
            f"`python benchmarks/memory.py --model {args.model} --budget {args.budget}`: "
            "one forward_backward per fresh process (after a 32-token warm-up), LoRA rank "
            "32 on every linear, summed cross-entropy. Peak RSS is the process's whole "
            "peak (weights and runtime included).\n\n" + table,
        )


if __name__ == "__main__":
    main()
