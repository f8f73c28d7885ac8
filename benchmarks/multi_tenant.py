"""Many runs on one base: packed multi-LoRA passes against one run at a time; memory; MFU.

Throughput: K runs (K = 1, 4, 16) each queue one forward_backward of `--batch` x `--seq`
tokens and an optim_step per step, all at once, through the in-process transport's
scheduler. "batched" lets the scheduler pack the K forward_backwards into one pass over
the base (each row through its own adapter); "one at a time" is the same scheduler with
packing off (`max_pass_tokens=0`), so each run gets its own pass. Both are timed in this
process, alternating in rounds; the median round is reported.

Memory: resident memory (RSS; on a GPU, allocated device memory) of a fresh process
that loads the base and trains K runs one step, for K = 1, 4, 16.

MFU: one run's training step (forward_backward + optim_step) at `--mfu-batch` x
`--mfu-seq`: model FLOPs per second over the machine's matmul peak, measured in this
process with torch.matmul (fp32 on CPU, bf16 on GPU). Model FLOPs of a LoRA step: the
frozen base needs the forward (2 N T) and the input gradients (2 N T) but no weight
gradients, so 4 N T for the N weights in its matmuls (the unembedding included, the
embedding lookup not), plus attention scores and values (4 T s d per layer forward, 3x
that with backward, causal half counted), plus 6 N_lora T for the adapters.

    python benchmarks/multi_tenant.py [--model llama-50m|tinkerd/tiny] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tinkerd.threads import prefer_passive_wait

prefer_passive_wait()  # before torch loads: measure tinkerd's default threading (tinkerd.threads)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, record  # noqa: E402
from train_overhead import bare_peft_step_fn, make_batch  # noqa: E402

from tinkerd import AdamParams, Datum, ModelInput, ServiceClient  # noqa: E402
from tinkerd.client.transport import InProcessTransport  # noqa: E402
from tinkerd.engine import Engine  # noqa: E402
from tinkerd.service import Service, ServiceConfig  # noqa: E402
from tinkerd.types import LoraConfig  # noqa: E402

LLAMA_50M = dict(  # ~50M parameters, random init: 8 x 4.96M in the blocks + 2 x 5.2M
    vocab_size=8192,
    hidden_size=640,
    intermediate_size=1728,
    num_hidden_layers=8,
    num_attention_heads=10,
    num_key_value_heads=10,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
ADAM = AdamParams(learning_rate=1e-4)


def model_path(name: str, cache: Path) -> str:
    """`llama-50m` is built here (random weights, the tiny model's byte tokenizer)."""
    if name != "llama-50m":
        return name
    out = cache / "llama-50m"
    if not (out / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        from tinkerd.engine.tiny import build_tokenizer

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA_50M)).save_pretrained(out)
        build_tokenizer().save_pretrained(out)
    return str(out)


def batch_data(vocab: int, batch: int, seq: int, seed: int) -> list[Datum]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen).tolist()
    return [
        Datum(
            model_input=ModelInput.from_ints(t[:-1]),
            loss_fn_inputs={"target_tokens": t[1:], "weights": [1.0] * seq},
        )
        for t in tokens
    ]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- throughput


def throughput(engine: Engine, model: str, args, k: int) -> dict[str, tuple[float, float]]:
    """Aggregate training tokens/s of k runs, packed and one at a time, and tokens per
    CPU second of this process (what a loaded machine's other processes change least)."""
    vocab = engine.base_model(model).vocab_size
    transports = {"batched": InProcessTransport(engine=engine), "one at a time": None}
    alone = Service(engine, config=ServiceConfig(max_pass_tokens=0), recover=False)
    transports["one at a time"] = InProcessTransport(service=alone)
    clients = {
        mode: [
            ServiceClient(transport=t).create_lora_training_client(model, rank=args.rank, seed=i)
            for i in range(k)
        ]
        for mode, t in transports.items()
    }
    data = [batch_data(vocab, args.batch, args.seq, seed=i) for i in range(k)]

    def step(mode: str) -> None:
        fbs = [c.forward_backward(d, "cross_entropy") for c, d in zip(clients[mode], data)]
        opts = [c.optim_step(ADAM) for c in clients[mode]]
        [f.result() for f in fbs + opts]

    for mode in transports:  # warm up
        step(mode)
    times: dict[str, list[float]] = {mode: [] for mode in transports}
    cpu: dict[str, list[float]] = {mode: [] for mode in transports}
    for _ in range(args.rounds):
        for mode in transports:
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(mode)
            sync(args.device)
            times[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - start_cpu)
    tokens = k * args.batch * args.seq * args.steps
    for mode, t in transports.items():
        for c in clients[mode]:
            c.unload_model().result()
        t.close()
    return {
        mode: (tokens / statistics.median(times[mode]), tokens / statistics.median(cpu[mode]))
        for mode in transports
    }


# ---------------------------------------------------------------- memory


def memory_child(args) -> None:
    """In a fresh process: memory after loading the base, then after k runs' first step."""
    engine = Engine(device=args.device)
    model = model_path(args.model, Path(args.cache))
    vocab = engine.base_model(model).vocab_size
    before = resident(args.device)
    transport = InProcessTransport(engine=engine)
    clients = [
        ServiceClient(transport=transport).create_lora_training_client(
            model, rank=args.rank, seed=i
        )
        for i in range(args.memory_child)
    ]
    data = batch_data(vocab, 1, 16, seed=0)
    for c in clients:  # a tiny batch: optimizer state made, few activations left behind
        c.forward_backward(data, "cross_entropy").result()
        c.optim_step(ADAM).result()
    run = engine.run(clients[0].model_id)
    state_bytes = sum(p.numel() * p.element_size() * 3 for p in run.params)  # w, m, v
    print(json.dumps({"base": before, "after": resident(args.device), "state": state_bytes}))


def resident(device: str) -> int:
    """Bytes: allocated GPU memory, or this process's resident set on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(args, k: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(k), "--model", args.model]
    cmd += ["--cache", args.cache, "--device", args.device, "--rank", str(args.rank)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- MFU


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of the best of several n x n x n torch.matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        torch.matmul(a, b)
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_flops(engine: Engine, model: str, model_id: str, batch: int, seq: int) -> float:
    """Model FLOPs of one LoRA training step (module docstring): 4 N T for the base's
    matmul weights (adapters excluded, the unembedding counted once even when tied),
    attention scores and values with their backward, 6 N T for the run's adapter."""
    base = engine.base_model(model)
    config = base.model.config.get_text_config()
    emb = base.model.get_input_embeddings().weight
    matmul = sum(
        p.numel()
        for n, p in base.model.named_parameters()
        if n.endswith("weight") and p.ndim == 2 and "lora_" not in n
    )
    matmul -= emb.numel()  # a lookup, not a matmul (the unembedding counts unless tied)
    if base.model.get_output_embeddings().weight is emb:
        matmul += emb.numel()
    lora = sum(p.numel() for p in engine.run(model_id).params)
    tokens = batch * seq
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    attention = 3 * 4 * tokens * seq * width * config.num_hidden_layers / 2  # causal: half
    return 4 * matmul * tokens + attention + 6 * lora * tokens


def mfu(engine: Engine, model: str, args) -> dict[str, float]:
    vocab = engine.base_model(model).vocab_size
    model_id = engine.create_model(model, LoraConfig(rank=args.rank, seed=0))
    data = batch_data(vocab, args.mfu_batch, args.mfu_seq, seed=0)

    def step() -> None:
        engine.forward_backward(model_id, data, "cross_entropy")
        engine.optim_step(model_id, ADAM)

    # The ceiling on this machine: a bare PyTorch + PEFT loop's same step (same adapter
    # shape, summed cross-entropy, AdamW), alternating with tinkerd's in every round.
    tokens = make_batch(vocab, args.mfu_batch, args.mfu_seq)
    dtype = engine.base_model(model).dtype
    bare = bare_peft_step_fn(model, tokens, args.rank, ADAM.learning_rate, args.device, dtype)
    times: dict[str, list[float]] = {"tinkerd": [], "bare": []}
    step(), bare()
    for _ in range(args.rounds):
        for name, fn in (("tinkerd", step), ("bare", bare)):
            sync(args.device)
            start = time.perf_counter()
            fn()
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    flops = step_flops(engine, model, model_id, args.mfu_batch, args.mfu_seq)
    engine.unload_model(model_id)
    cuda = args.device.startswith("cuda")
    peak = matmul_peak(args.device, torch.bfloat16 if cuda else torch.float32, args.peak_n)
    achieved = flops / statistics.median(times["tinkerd"])
    bare_achieved = flops / statistics.median(times["bare"])
    return {
        "flops": flops,
        "achieved": achieved,
        "peak": peak,
        "mfu": achieved / peak,
        "bare_achieved": bare_achieved,
        "bare_mfu": bare_achieved / peak,
    }


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-50m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", default="1,4,16", help="K values, comma-separated")
    parser.add_argument("--batch", type=int, default=2, help="rows per run per step")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mfu-batch", type=int, default=8)
    parser.add_argument("--mfu-seq", type=int, default=256)
    parser.add_argument("--peak-n", type=int, default=0, help="matmul size (0: by device)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "tinkerd-bench"))
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="print, do not write docs")
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)
    args.peak_n = args.peak_n or (8192 if args.device.startswith("cuda") else 2048)
    ks = [int(k) for k in args.runs.split(",")]
    engine = Engine(device=args.device)
    model = model_path(args.model, Path(args.cache))
    base = engine.base_model(model)
    params = sum(p.numel() for p in base.model.parameters())
    dtype = str(next(base.model.parameters()).dtype).removeprefix("torch.")

    rows = []
    for k in ks:
        tput = throughput(engine, model, args, k)
        (alone, alone_cpu), (batched, batched_cpu) = tput["one at a time"], tput["batched"]
        rows.append(
            f"| {k} | {alone:,.0f} | {batched:,.0f} | {batched / alone:.2f} | "
            f"{batched_cpu / alone_cpu:.2f} |"
        )
        print(rows[-1], flush=True)
    mem = {k: memory(args, k) for k in ks}
    mib = 1 << 20
    mem_rows = [
        f"| {k} | {m['after'] / mib:,.1f} | {(m['after'] - m['base']) / mib:,.1f} | "
        f"{m['state'] / mib:.2f} |"
        for k, m in mem.items()
    ]
    k0, k1 = ks[0], ks[-1]
    per_run = (mem[k1]["after"] - mem[k0]["after"]) / max(k1 - k0, 1) / mib
    m = mfu(engine, model, args)
    where = "GPU memory allocated" if args.device.startswith("cuda") else "process RSS"
    body = f"""
`python benchmarks/multi_tenant.py --model {args.model} --device {args.device} --batch \
{args.batch} --seq {args.seq} --rank {args.rank}`: base {args.model} ({params / 1e6:.1f}M \
parameters, {dtype}), LoRA rank {args.rank} on every linear layer. Each of K runs queues \
one forward_backward of {args.batch} x {args.seq} tokens and an optim_step per step; \
"batched" packs the K forward_backwards into one pass over the base (each row through its \
own adapter), "one at a time" gives each run its own pass (same scheduler, packing off). \
Median of {args.rounds} rounds of {args.steps} steps, alternating; the last column \
compares tokens per CPU second of this process (`time.process_time`), which other \
processes on a loaded machine change far less than the wall clock.

| K runs | one at a time tok/s | batched tok/s | batched / one at a time | same, per CPU second |
|---|---|---|---|---|
{chr(10).join(rows)}

Memory ({where}, a fresh process per K: the base loaded, then K runs trained one step):

| K runs | total MiB | above the base MiB | one run's LoRA weights + Adam state MiB |
|---|---|---|---|
{chr(10).join(mem_rows)}

Each run beyond the first adds {per_run:.1f} MiB: its adapter and optimizer state \
(plus allocator slack); the base weights exist once.

MFU, one run's training step (forward_backward + optim_step), {args.mfu_batch} x \
{args.mfu_seq} tokens: {m["flops"] / 1e9:,.1f} GFLOP per step (4 N T for the frozen base's \
matmuls, attention, 6 N T for the adapter) at {m["achieved"] / 1e9:,.1f} GFLOP/s, against a \
measured torch.matmul peak of {m["peak"] / 1e9:,.1f} GFLOP/s ({args.peak_n}^3, \
{"bf16" if args.device.startswith("cuda") else "fp32"}): **MFU {m["mfu"]:.0%}**. The \
same step in a bare PyTorch + PEFT loop (timed alternately): {m["bare_achieved"] / 1e9:,.1f} \
GFLOP/s, MFU {m["bare_mfu"]:.0%} (tinkerd / bare {m["achieved"] / m["bare_achieved"]:.2f}).
"""
    print(body)
    if not args.no_record:
        name = f"multi_tenant ({args.model}, {args.device}, {dtype})"
        record(name, body)
    print(machine())


if __name__ == "__main__":
    main()
