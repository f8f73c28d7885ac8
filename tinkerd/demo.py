"""`tinkerd demo`: supervised fine-tuning of `tinkerd/tiny` to reverse strings.

The task is generated here (no data download): the prompt is a word, the completion is
the word reversed followed by end-of-sequence. Only completion tokens carry weight.
Accuracy is measured on held-out words the model never trains on: a word counts as
solved when every answer token has probability above 1/2, which guarantees that greedy
decoding writes exactly the answer.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from tinkerd.client import ServiceClient, TrainingClient
from tinkerd.types import AdamParams, Datum, ModelInput

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_words(rng: random.Random, count: int, exclude: set[str] = frozenset()) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        if word not in exclude:
            words.append(word)
    return words


def reversal_datum(tokenizer, word: str) -> Datum:
    prompt = [tokenizer.bos_token_id, *tokenizer.encode(word + "=")]
    answer = [*tokenizer.encode(word[::-1]), tokenizer.eos_token_id]
    tokens = prompt + answer
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


@dataclass
class Evaluation:
    loss_per_token: float
    accuracy: float


def evaluate(client: TrainingClient, data: list[Datum]) -> Evaluation:
    """Held-out NLL per answer token, and the fraction of words greedy decoding solves."""
    out = client.forward(data, "cross_entropy").result()
    threshold = math.log(0.5)
    solved, tokens = 0, 0
    for datum, result in zip(data, out.loss_fn_outputs):
        weights = datum.loss_fn_inputs["weights"].data
        answer_lps = [lp for lp, w in zip(result["logprobs"].data, weights) if w > 0]
        solved += all(lp > threshold for lp in answer_lps)
        tokens += len(answer_lps)
    return Evaluation(out.metrics["loss:sum"] / tokens, solved / len(data))


def run_demo(
    steps: int = 500,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    rank: int = 32,
    seed: int = 0,
    held_out: int = 200,
    service: ServiceClient | None = None,
    progress: bool = True,
) -> tuple[Evaluation, Evaluation]:
    from tqdm import tqdm

    started = time.time()
    service = service or ServiceClient()
    client = service.create_lora_training_client("tinkerd/tiny", rank=rank, seed=seed)
    tokenizer = client.get_tokenizer()
    rng = random.Random(seed)
    test_words = make_words(random.Random(10_000 + seed), held_out)
    test_data = [reversal_datum(tokenizer, w) for w in test_words]

    before = evaluate(client, test_data)
    print(
        f"before: held-out loss {before.loss_per_token:.3f}/token, "
        f"accuracy {before.accuracy:.1%} ({held_out} unseen words)"
    )
    adam = AdamParams(learning_rate=learning_rate, grad_clip_norm=1.0)
    bar = tqdm(range(steps), desc="SFT: reverse words", disable=not progress)
    for _ in bar:
        words = make_words(rng, batch_size, exclude=set(test_words))
        batch = [reversal_datum(tokenizer, w) for w in words]
        # Pipelined: both requests are queued before waiting on either.
        fwd_bwd = client.forward_backward(batch, "cross_entropy")
        optim = client.optim_step(adam)
        answer_tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
        bar.set_postfix(loss=f"{fwd_bwd.result().metrics['loss:sum'] / answer_tokens:.3f}")
        optim.result()
    after = evaluate(client, test_data)
    print(
        f"after:  held-out loss {after.loss_per_token:.3f}/token, "
        f"accuracy {after.accuracy:.1%}  ({steps} steps x {batch_size} words, "
        f"{time.time() - started:.0f}s)"
    )
    return before, after
