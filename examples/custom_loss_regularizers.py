"""Train tinkerd/tiny with a base loss and two regularizers; print the breakdown each step.

    python examples/custom_loss_regularizers.py [--steps 20] [--base-url http://127.0.0.1:8000]

The base loss is the weighted token NLL of the word-reversal task of `tinkerd demo`; the
regularizers are an entropy bonus (negative weight: keep the sampled tokens' entropy up)
and a length-normalised NLL (every word counts the same, whatever its length).
"""

from __future__ import annotations

import argparse
import random

import torch

from tinkerd import AdamParams, RegularizerSpec, ServiceClient, regularizers
from tinkerd.demo import make_words, reversal_datum


def weighted_nll(data, logprobs_list):
    loss = sum(
        (-d.loss_fn_inputs["weights"].to_torch() * lp).sum() for d, lp in zip(data, logprobs_list)
    )
    tokens = sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in data)
    return loss, {"nll_per_token:mean": loss.item() / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--base-url", default=None, help="a tinkerd server (default: embedded)")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()

    service = ServiceClient(base_url=args.base_url, api_key=args.api_key)
    client = service.create_lora_training_client("tinkerd/tiny", rank=32, seed=0)
    tokenizer = client.get_tokenizer()
    rng = random.Random(0)
    specs = [
        RegularizerSpec(fn=regularizers.entropy_proxy, weight=-0.01, name="entropy"),
        RegularizerSpec(fn=regularizers.length_normalized_nll, weight=0.5, name="len_nll"),
    ]
    header = f"{'step':>4} {'term':<9} {'value':>10} {'weight':>7} {'contrib':>10} "
    header += f"{'grad_norm':>10} {'weighted':>9}"
    for step in range(args.steps):
        batch = [reversal_datum(tokenizer, w) for w in make_words(rng, 16)]
        out = client.forward_backward_custom(
            batch, weighted_nll, regularizers=specs, track_grad_norms=True
        ).result()
        client.optim_step(AdamParams(learning_rate=2e-3)).result()
        print(header if step == 0 else "")
        base = out.base_loss
        print(
            f"{step:>4} {'base':<9} {base.value:>10.3f} {1.0:>7.2f} {base.value:>10.3f} "
            f"{base.grad_norm:>10.3f} {base.grad_norm:>9.3f}"
        )
        for name, r in out.regularizers.items():
            print(
                f"{'':>4} {name:<9} {r.value:>10.3f} {r.weight:>7.2f} {r.contribution:>10.3f} "
                f"{r.grad_norm:>10.3f} {r.grad_norm_weighted:>9.3f}"
            )
        print(
            f"{'':>4} {'total':<9} {out.loss_total:>10.3f} {'':>7} {'':>10} "
            f"{out.total_grad_norm:>10.3f}"
        )
    service.close()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
