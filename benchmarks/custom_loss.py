"""Cost of forward_backward_custom (base loss + 2 regularizers) over plain forward_backward.

Same run, batch and loss value: the custom base loss is sum(-weights * logprobs), i.e. the
built-in cross_entropy. Embedded, the custom path is one forward and one backward on the
live graph; over HTTP (a `tinkerd serve` subprocess on loopback) it is Tinker's two
phases (a forward, then a forward_backward), so about one extra forward.

    python benchmarks/custom_loss.py [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, record  # noqa: E402
from train_overhead import BENCH_KEY, make_batch, tinkerd_server  # noqa: E402

from tinkerd import AdamParams, Datum, ModelInput, RegularizerSpec, ServiceClient  # noqa: E402
from tinkerd import regularizers as regs  # noqa: E402


def nll(data, logprobs_list):
    return sum(
        (-d.loss_fn_inputs["weights"].to_torch() * lp).sum() for d, lp in zip(data, logprobs_list)
    ), {}


SPECS = [
    RegularizerSpec(fn=regs.entropy_proxy, weight=-0.01, name="entropy"),
    RegularizerSpec(fn=regs.l2_logprobs, weight=1e-4, name="l2"),
]


def seconds_per_step(service: ServiceClient, data: list[Datum], custom: bool, steps: int) -> float:
    client = service.create_lora_training_client("tinkerd/tiny", rank=32, seed=0)
    adam = AdamParams(learning_rate=1e-4)

    def step() -> None:
        if custom:
            client.forward_backward_custom(data, nll, regularizers=SPECS).result()
        else:
            client.forward_backward(data, "cross_entropy").result()
        client.optim_step(adam).result()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    tokens = make_batch(256, args.batch, args.seq)
    data = [
        Datum(
            model_input=ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={"target_tokens": row[1:].tolist(), "weights": [1.0] * args.seq},
        )
        for row in tokens
    ]
    rows = [
        "| transport | forward_backward s/step | custom + 2 regularizers s/step | ratio |",
        "|---|---|---|---|",
    ]
    with tinkerd_server("tinkerd/tiny") as url:
        services = {
            "embedded (one pass)": ServiceClient(),
            "HTTP (two phases)": ServiceClient(base_url=url, api_key=BENCH_KEY),
        }
        for name, service in services.items():
            plain, custom = [], []
            for _ in range(args.rounds):  # alternate so drift hits both alike
                plain.append(seconds_per_step(service, data, False, args.steps))
                custom.append(seconds_per_step(service, data, True, args.steps))
            p, c = statistics.median(plain), statistics.median(custom)
            rows.append(f"| {name} | {p:.3f} | {c:.3f} | {c / p:.3f} |")
    print(f"machine: {machine()}\nbatch {args.batch} x {args.seq} tokens, tinkerd/tiny, rank 32")
    print("\n".join(rows))
    if not args.no_record:
        record(
            f"custom_loss ({args.batch}x{args.seq})",
            "`python benchmarks/custom_loss.py`: forward_backward_custom with a base loss and "
            "two regularizers (entropy proxy, L2 of logprobs) against plain forward_backward, "
            f"each followed by optim_step; median of {args.rounds} rounds of {args.steps} "
            "steps.\n\n" + "\n".join(rows),
        )


if __name__ == "__main__":
    main()
