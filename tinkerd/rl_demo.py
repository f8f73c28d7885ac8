"""`tinkerd demo --rl`: GRPO-style reinforcement learning on `tinkerd/tiny`.

The task has a reward the program checks: after the prompt `<bos>letters:`, write
`completion_tokens` bytes; the reward is the number of *different* lowercase ASCII
letters among them, over `completion_tokens` (so repeating one letter scores little).
The random base model writes a lowercase letter about 8% of the time. Each step samples a
group of completions per prompt from the current weights, scores them, and takes a
policy-gradient step with the `importance_sampling` loss, using the sampler's own
logprobs and the reward minus the group's mean as the advantage (GRPO without the std).
"""

from __future__ import annotations

import time

from tinkerd.client import SamplingClient, ServiceClient, TrainingClient
from tinkerd.types import AdamParams, Datum, ModelInput, SampleResponse, SamplingParams

LOWERCASE = set(range(ord("a"), ord("z") + 1))


def reward(tokens: list[int]) -> float:
    return len(LOWERCASE.intersection(tokens)) / max(len(tokens), 1)


def group_data(prompt: list[int], result: SampleResponse) -> tuple[list[Datum], float]:
    """One datum per sampled sequence, with group-relative advantages on its tokens."""
    rewards = [reward(seq.tokens) for seq in result.sequences]
    mean = sum(rewards) / len(rewards)
    data = []
    for seq, r in zip(result.sequences, rewards):
        tokens = prompt + seq.tokens
        n_prompt = len(prompt) - 1  # prompt positions predict prompt tokens: no weight
        data.append(
            Datum(
                model_input=ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs": [0.0] * n_prompt + seq.logprobs,
                    "advantages": [0.0] * n_prompt + [r - mean] * len(seq.tokens),
                },
            )
        )
    return data, mean


def rl_step(
    client: TrainingClient,
    sampler: SamplingClient,
    prompt: list[int],
    groups: int,
    group_size: int,
    params: SamplingParams,
    adam: AdamParams,
) -> float:
    """Sample, score, and take one step; returns the mean reward of the samples."""
    # Each group its own seed (params.seed + g), so a run is reproducible from one seed.
    seeds = [None if params.seed is None else params.seed + g for g in range(groups)]
    futures = [
        sampler.sample(prompt, group_size, params.model_copy(update={"seed": s})) for s in seeds
    ]
    data, means = [], []
    for future in futures:  # all groups are decoded together in one batch
        group, mean = group_data(prompt, future.result())
        data += group
        means.append(mean)
    client.forward_backward(data, "importance_sampling")
    client.optim_step(adam).result()
    return sum(means) / len(means)


def run_rl_demo(
    steps: int = 40,
    groups: int = 4,
    group_size: int = 8,
    completion_tokens: int = 8,
    learning_rate: float = 1e-2,
    rank: int = 16,
    seed: int = 0,
    service: ServiceClient | None = None,
    progress: bool = True,
) -> list[float]:
    """Returns the mean reward of each step's samples."""
    from tqdm import tqdm

    started = time.time()
    service = service or ServiceClient()
    client = service.create_lora_training_client("tinkerd/tiny", rank=rank, seed=seed)
    tokenizer = client.get_tokenizer()
    prompt = [tokenizer.bos_token_id, *tokenizer.encode("letters:")]
    params = SamplingParams(max_tokens=completion_tokens, temperature=1.0, stop=[])
    adam = AdamParams(learning_rate=learning_rate, grad_clip_norm=1.0)
    rewards = []
    bar = tqdm(range(steps), desc="RL: distinct lowercase letters", disable=not progress)
    for step in bar:
        sampler = client.save_weights_and_get_sampling_client()  # the current policy
        step_params = params.model_copy(update={"seed": (seed * steps + step) * groups})
        rewards.append(rl_step(client, sampler, prompt, groups, group_size, step_params, adam))
        bar.set_postfix(reward=f"{rewards[-1]:.2f}")
    sampler = client.save_weights_and_get_sampling_client()
    final = sampler.sample(prompt, 4, SamplingParams(max_tokens=completion_tokens, stop=[]))
    examples = [tokenizer.decode(s.tokens) for s in final.result().sequences]
    k = min(5, len(rewards))
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(
        f"mean reward: first {k} steps {first:.2f}, last {k} steps {last:.2f} "
        f"({steps} steps x {groups * group_size} samples, {time.time() - started:.0f}s)"
    )
    print("samples now:", ", ".join(repr(e) for e in examples))
    return rewards
