"""Training throughput of tinkerd against a bare PyTorch + PEFT loop, same model and batch.

Loops: the bare loop, tinkerd embedded (in-process engine), and, through a `tinkerd serve`
subprocess on loopback, tinkerd's own HTTP client and the official `tinker` SDK. All
take the same step (LoRA rank 32 on every linear layer, summed token
cross-entropy, AdamW) on the same fixed batch. Timing alternates between the loops
in rounds so that machine drift hits both alike; the median of the rounds is reported.

    python benchmarks/train_overhead.py [--model tinkerd/tiny] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, record  # noqa: E402

from tinkerd import AdamParams, Datum, ModelInput, ServiceClient  # noqa: E402
from tinkerd.engine.adapters import LORA_ALPHA  # noqa: E402
from tinkerd.engine.models import classify_linears, resolve_model_path  # noqa: E402


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 256), (batch, seq + 1), generator=gen)


def bare_peft_step_fn(
    model_name: str,
    tokens: torch.Tensor,
    rank: int,
    lr: float,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval().requires_grad_(False)
    targets = list(classify_linears(model))
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    inputs, labels = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def step() -> float:
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def tinkerd_step_fn(
    model_name: str, tokens: torch.Tensor, rank: int, lr: float, service: ServiceClient
):
    client = service.create_lora_training_client(model_name, rank=rank, seed=0)
    data = [
        Datum(
            model_input=ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={"target_tokens": row[1:].tolist(), "weights": [1.0] * (len(row) - 1)},
        )
        for row in tokens
    ]
    adam = AdamParams(learning_rate=lr)

    def step() -> float:
        fb = client.forward_backward(data, "cross_entropy")
        client.optim_step(adam).result()
        return fb.result().metrics["loss:sum"]

    return step


def official_sdk_step_fn(model_name: str, tokens: torch.Tensor, rank: int, lr: float, url: str):
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=BENCH_KEY)
    client = service.create_lora_training_client(base_model=model_name, rank=rank, seed=0).result()
    data = [
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={"target_tokens": row[1:].tolist(), "weights": [1.0] * (len(row) - 1)},
        )
        for row in tokens
    ]
    adam = tinker.AdamParams(learning_rate=lr)

    def step() -> float:
        fb = client.forward_backward(data, "cross_entropy")
        client.optim_step(adam).result()
        return fb.result().metrics["loss:sum"]

    return step


BENCH_KEY = "tml-benchmark"


@contextlib.contextmanager
def tinkerd_server(
    model_name: str, info: dict | None = None, extra: tuple[str, ...] = (), stderr=None
):
    """`tinkerd serve` (with `extra` arguments) in a subprocess on a free loopback port;
    yields its URL (and puts the process id in `info["pid"]`). `stderr`: where its
    stderr goes (None: ours)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        sys.executable,
        "-m",
        "tinkerd.cli",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        tempfile.mkdtemp(prefix="tinkerd-bench-"),
        "--api-key",
        BENCH_KEY,
        *extra,
    ]
    if model_name != "tinkerd/tiny":
        args += ["--model", model_name]
    proc = subprocess.Popen(args, stderr=stderr)
    if info is not None:
        info["pid"] = proc.pid
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/api/v1/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def tokens_per_second(step, n_tokens: int, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return n_tokens * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tinkerd/tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP loops")
    parser.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = None if args.no_http else stack.enter_context(tinkerd_server(args.model))
        run(args, url)


def run(args: argparse.Namespace, url: str | None) -> None:
    tokens = make_batch(256, args.batch, args.seq)
    n_tokens = args.batch * args.seq
    loops = {
        "bare PyTorch+PEFT": bare_peft_step_fn(args.model, tokens, args.rank, 1e-4),
        "tinkerd embedded": tinkerd_step_fn(args.model, tokens, args.rank, 1e-4, ServiceClient()),
    }
    if url:
        http = ServiceClient(base_url=url, api_key=BENCH_KEY)
        loops["tinkerd HTTP, tinkerd client"] = tinkerd_step_fn(
            args.model, tokens, args.rank, 1e-4, http
        )
        loops["tinkerd HTTP, official tinker SDK"] = official_sdk_step_fn(
            args.model, tokens, args.rank, 1e-4, url
        )
    first_losses = {name: step() for name, step in loops.items()}  # also warms up
    for step in loops.values():
        step()
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, step in loops.items():
            rates[name].append(tokens_per_second(step, n_tokens, args.steps))

    median = {name: statistics.median(r) for name, r in rates.items()}
    base = median["bare PyTorch+PEFT"]
    print(f"machine: {machine()}")
    print(f"model {args.model}, batch {args.batch} x {args.seq} tokens, LoRA rank {args.rank}")
    print(f"first-step loss (same weights, must agree): {first_losses}")
    rows = ["| loop | tokens/s (median of rounds) | ratio to bare |", "|---|---|---|"]
    for name, value in median.items():
        rows.append(f"| {name} | {value:,.0f} | {value / base:.3f} |")
    print("\n".join(rows))
    if not args.no_record:
        record(
            f"train_overhead ({args.model}, {args.batch}x{args.seq})",
            f"`python benchmarks/train_overhead.py --model {args.model} --batch {args.batch} "
            f"--seq {args.seq}`: {args.rounds} rounds of {args.steps} steps, LoRA rank "
            f"{args.rank}. The HTTP loops talk to a `tinkerd serve` subprocess on loopback "
            "(client and server share the machine's cores).\n\n" + "\n".join(rows),
        )


if __name__ == "__main__":
    main()
