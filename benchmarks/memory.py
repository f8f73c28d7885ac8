"""Peak memory (RSS) and speed of one forward_backward: tinkerd within a memory budget
against a bare PyTorch + PEFT step with transformers' defaults, each in a fresh process.

Both take the same step: LoRA rank 32 on every linear layer, summed token cross-entropy,
float32 base weights, a fixed batch of random tokens. Each child process loads the
model, warms up with one forward_backward of 32 tokens, then times one forward_backward
of the batch and reports its peak RSS (`ru_maxrss`, which includes the weights and the
Python runtime) and the RSS before the batch. The growth over the RSS before, divided by
the tokens of one micro-batch (those whose activations are alive at once), is the MB a
token.

Variants (`--variants`, comma-separated):
- `budget`: tinkerd as served with `--memory-budget BUDGET` (the plan picks micro-batches,
  logits chunk and layer checkpointing; `engine.memory.plan`);
- `ckpt` / `no-ckpt`: layer checkpointing forced on / off, the whole batch in one
  micro-batch (the budget only sizes the output layer's window), so the growth per token
  is the method's own cost;
- `whole-ckpt`: as `ckpt` with the model's own `[tokens, vocab]` logits (the output layer
  unchunked, as before issue 26);
- `bare`: the bare PyTorch + PEFT loop.
A child whose estimated growth would not fit in the machine's available memory (with
1.5 GB to spare) is skipped, not run.

`--compare-budgets A,B --pairs N`: the `budget` variant at budget A and B (`auto`: the
default, a quarter of the available memory) in fresh processes, alternating (A B B A ...),
for the time ratio of the two.

    python benchmarks/memory.py [--model smollm2] [--sizes 4x512,4x1024,16x1024]
        [--budget 1.5GiB] [--variants budget,bare] [--no-record]
    python benchmarks/memory.py --sizes 4x512 --compare-budgets 1GiB,auto --pairs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("budget", "ckpt", "no-ckpt", "whole-ckpt", "bare")
SPARE_BYTES = 1.5e9


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def tokens(vocab: int, batch: int, seq: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 20000), (batch, seq + 1), generator=gen)


def child_tinkerd(model: str, batch: int, seq: int, budget: str | None, variant: str) -> dict:
    import torch
    from gpu_check import micro_batch_rows

    from tinkerd.engine import Engine, EngineConfig, compute
    from tinkerd.engine.models import BUILT_IN
    from tinkerd.types import Datum, LoraConfig, ModelInput

    if variant == "whole-ckpt":  # the output layer as one `[tokens, vocab]` block (and the
        compute.output_layer = lambda model: None  # memory plan's estimate for it)
        compute.memory.output_layer = compute.output_layer

    config = EngineConfig(dtype="float32", memory_budget_bytes=budget)
    engine = Engine(extra_models=[] if model in BUILT_IN else [model], config=config)
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
    limits = engine.pass_limits(model_id, batch_data)
    if variant != "budget":  # one micro-batch; checkpointing as the variant says
        forced = dict(micro_batch_tokens=None, micro_batch_rows=None, memory_budget_bytes=None)
        limits = dataclasses.replace(limits, **forced, checkpoint=variant != "no-ckpt")
        engine.limits = limits
    before = rss_bytes()
    start = time.perf_counter()
    out = engine.forward_backward(model_id, batch_data)
    seconds = time.perf_counter() - start
    return {
        "loss": out.metrics["loss:sum"],
        "seconds": seconds,
        "rss_before": before,
        "peak_rss": peak_rss_bytes(),
        "budget": engine.config.limits.memory_budget_bytes,
        "checkpoint": limits.checkpoint,
        "micro_batch_rows": micro_batch_rows(limits, batch, seq),
        "logits_chunk": limits.logits_chunk_tokens,
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


def run_child(kind: str, model: str, batch: int, seq: int, budget: str | None) -> dict:
    """`kind` (a variant) in a fresh process; its JSON, or {"error": its last line}."""
    args = [sys.executable, __file__, "--child", kind, "--model", model]
    args += ["--sizes", f"{batch}x{seq}"] + (["--budget", budget] if budget else [])
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimated_growth(model: str, variant: str, batch: int, seq: int) -> float:
    """Bytes the variant's pass may add at most (the memory plan's estimate of a single
    micro-batch, whole logits for the bare loop); 0 where the budget bounds it."""
    from transformers import AutoConfig

    from tinkerd.engine.memory import ModelShape
    from tinkerd.engine.models import resolve_model_path

    if variant == "budget":
        return 0.0
    config = AutoConfig.from_pretrained(resolve_model_path(model))
    chunked = variant in ("ckpt", "no-ckpt")
    shape = ModelShape(config.hidden_size, config.num_hidden_layers, config.vocab_size, 4, chunked)
    checkpoint = variant in ("ckpt", "whole-ckpt")
    return shape.token_bytes(backward=True, checkpoint=checkpoint) * batch * seq


def available_bytes() -> int:
    from tinkerd.engine.memory import _mem_available

    return _mem_available()


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def per_token_mb(result: dict, seq: int) -> float:
    """Growth over the RSS before, per token of one micro-batch (MB)."""
    rows = result.get("micro_batch_rows") or result["batch"]
    return (result["peak_rss"] - result["rss_before"]) / (rows * seq) / 1e6


def plan_text(result: dict, batch: int) -> str:
    if "checkpoint" not in result:
        return "one forward of the whole batch, whole logits"
    rows = result["micro_batch_rows"]
    cut = "one micro-batch" if rows >= batch else f"{math.ceil(batch / rows)} micro-batches"
    ckpt = "checkpointing" if result["checkpoint"] else "no checkpointing"
    return f"{cut} of {rows} rows, {ckpt}, logits window {result['logits_chunk']} positions"


def compare_budgets(args, sizes: list[tuple[int, int]]) -> None:
    """The `budget` variant at two budgets, alternating fresh processes (A B B A ...)."""
    first, second = args.compare_budgets.split(",")
    for batch, seq in sizes:
        runs: dict[str, list[dict]] = {first: [], second: []}
        for i in range(args.pairs):
            for budget in (first, second) if i % 2 == 0 else (second, first):
                result = run_child("budget", args.model, batch, seq, budget)
                print(f"{batch}x{seq} budget {budget}: {result}", flush=True)
                runs[budget].append(result)
        lines = [
            f"| budget | plan | seconds ({args.pairs} runs) | median s | peak RSS GB | loss |",
            "|---|---|---|---|---|---|",
        ]
        for budget, results in runs.items():
            ok = [r for r in results if "seconds" in r]
            if not ok:
                lines.append(f"| {budget} | {results[0].get('error')} | - | - | - | - |")
                continue
            times = ", ".join(f"{r['seconds']:.1f}" for r in ok)
            peak = max(r["peak_rss"] for r in ok)
            median = statistics.median(r["seconds"] for r in ok)
            lines.append(
                f"| {budget} ({gb(ok[0]['budget'])} GB) | {plan_text(ok[0], batch)} | {times} "
                f"| {median:.1f} | {gb(peak)} | {ok[0]['loss']:.2f} |"
            )
        medians = [statistics.median(r["seconds"] for r in runs[b] if "seconds" in r) for b in runs]
        lines.append(f"\n{first} / {second} time (medians): **{medians[0] / medians[1]:.2f}x**")
        print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sizes", default="4x512,4x1024,16x1024")
    parser.add_argument("--variants", default="budget,bare", help=", ".join(VARIANTS))
    parser.add_argument("--budget", default="1.5GiB", help="tinkerd's --memory-budget")
    parser.add_argument("--compare-budgets", help="A,B: the budget variant at both, alternating")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",") if s]
    if args.child:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        batch, seq = sizes[0]
        if args.child == "bare":
            result = child_bare(args.model, batch, seq)
        else:
            result = child_tinkerd(args.model, batch, seq, args.budget, args.child)
        print(json.dumps(result | {"batch": batch}))
        return
    if args.compare_budgets:
        return compare_budgets(args, sizes)
    variants = [v for v in args.variants.split(",") if v]
    rows = []
    for batch, seq in sizes:
        for variant in variants:
            need = estimated_growth(args.model, variant, batch, seq)
            if need + SPARE_BYTES > available_bytes():
                result = {"error": f"not run: needs ~{gb(need)} GB"}
            else:
                result = run_child(variant, args.model, batch, seq, args.budget)
            print(f"{variant} {batch}x{seq}: {result}", flush=True)
            rows.append((batch, seq, variant, result))
    lines = [
        "| size | variant | plan | peak RSS GB | growth GB | MB a token | tokens/s | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, seq, variant, r in rows:
        cells = [f"{batch}x{seq}", variant]
        if "peak_rss" in r:
            cells += [plan_text(r, batch), gb(r["peak_rss"]), gb(r["peak_rss"] - r["rss_before"])]
            cells += [f"{per_token_mb(r, seq):.3f}", f"{batch * seq / r['seconds']:.0f}"]
            cells += [f"{r['loss']:.2f}"]
        else:
            cells += [r.get("error", "?"), "-", "-", "-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        from _report import record

        record(
            f"memory ({args.model}, float32)",
            f"`python benchmarks/memory.py --model {args.model} --budget {args.budget} "
            f"--variants {args.variants}`: one forward_backward per fresh process (after a "
            "32-token warm-up), LoRA rank 32 on every linear, summed cross-entropy. Peak RSS "
            "is the process's whole peak (weights and runtime included); MB a token is the "
            "growth over the RSS before the step per token of one micro-batch.\n\n" + table,
        )


if __name__ == "__main__":
    main()
