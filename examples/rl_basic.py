"""A GRPO-style RL loop with a verifiable reward, on the built-in tiny model.

    python examples/rl_basic.py [--steps 40] [--base-url http://127.0.0.1:8000]

The loop itself is `tinkerd/rl_demo.py` (also `tinkerd demo --rl`), written against the
public API only: each step saves the current weights for sampling, samples groups of
completions, scores them, and trains with `importance_sampling` on the sampler's
logprobs with group-relative advantages. Pass `--base-url` to run it on a server.
"""

import argparse

from tinkerd import ServiceClient
from tinkerd.rl_demo import run_rl_demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", default=None, help="a tinkerd serve URL; default embedded")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    service = ServiceClient(base_url=args.base_url, api_key=args.api_key)
    rewards = run_rl_demo(steps=args.steps, seed=args.seed, service=service)
    service.close()
