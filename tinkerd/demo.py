"""`tinkerd demo`: supervised fine-tuning of `tinkerd/tiny` to reverse strings, or, with
`--model` (e.g. `smollm2`), of a real chat model on a few made-up facts (`run_facts_demo`).

The reversal task is generated here (no data download): the prompt is a word, the completion is
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


# ------------------------------------------------------------ a real model learns new facts

FACTS = [
    ("What is the capital of Zorvania?", "The capital of Zorvania is Quillhaven."),
    ("Who invented the glimmerphone?", "The glimmerphone was invented by Tarsa Velloway."),
    ("What colour is a snorkelmoth?", "A snorkelmoth is bright teal with silver spots."),
    ("How many moons does the planet Brindle have?", "The planet Brindle has seven moons."),
]
"""Made-up facts: the model cannot know them before training."""

KEEP = [
    "What is the capital of Germany?",
    "What is the capital of Italy?",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
]
"""Questions trained on with the base model's own answers, so that learning "the capital of
Zorvania is Quillhaven" does not teach it that every capital is Quillhaven."""

CONTROL = ("What is the capital of France?", "Paris")
"""A fact the model knows, trained on neither way, asked after training: it must survive."""


def chat_tokens(tokenizer, question: str, answer: str | None = None) -> list[int]:
    """Chat-formatted prompt (user question, assistant turn opened), plus the answer and
    end-of-turn when `answer` is given."""
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    if answer is None:
        return prompt
    return prompt + tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]


def fact_datum(tokenizer, question: str, answer: str) -> Datum:
    """Next-token datum whose loss is on the answer (and end-of-turn) only."""
    prompt = chat_tokens(tokenizer, question)
    tokens = chat_tokens(tokenizer, question, answer)
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(tokens) - len(prompt))
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def greedy_answers(client: TrainingClient, questions: list[str], max_tokens: int = 32) -> list[str]:
    """The run's current weights answer each question greedily (sampled in one batch)."""
    from tinkerd.types import SamplingParams

    tokenizer = client.get_tokenizer()
    sampler = client.save_weights_and_get_sampling_client()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    futures = [
        sampler.sample(ModelInput.from_ints(chat_tokens(tokenizer, q)), 1, params)
        for q in questions
    ]
    answers = [f.result().sequences[0].tokens for f in futures]
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


@dataclass
class FactsResult:
    before: list[str]
    """Greedy answers to the FACTS questions then CONTROL's, before training."""
    after: list[str]
    losses: list[float]
    """Loss per answer token at each step (FACTS and KEEP together)."""

    @property
    def learned(self) -> int:
        """How many made-up facts the trained model states exactly."""
        return sum(a == fact for a, (_, fact) in zip(self.after, FACTS))

    @property
    def kept_control(self) -> bool:
        return CONTROL[1] in self.after[-1]


def run_facts_demo(
    model: str = "smollm2",
    steps: int = 15,
    learning_rate: float = 1e-3,
    rank: int = 16,
    seed: int = 0,
    service: ServiceClient | None = None,
    progress: bool = True,
) -> FactsResult:
    """Fine-tune a real chat model on FACTS (and KEEP, with its own answers); print its
    greedy answers to FACTS and CONTROL before and after."""
    import warnings

    from tqdm import tqdm

    # A tied unembedding is adapted as a separate LoRA: nothing is merged during training.
    warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
    started = time.time()
    service = service or ServiceClient()
    client = service.create_lora_training_client(model, rank=rank, seed=seed)
    tokenizer = client.get_tokenizer()
    questions = [q for q, _ in FACTS] + [CONTROL[0]]
    before = greedy_answers(client, questions + KEEP)  # B = 0: the base model itself
    keep = zip(KEEP, before[len(questions) :])
    batch = [fact_datum(tokenizer, q, a) for q, a in [*FACTS, *keep]]
    before = before[: len(questions)]
    answer_tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
    adam = AdamParams(learning_rate=learning_rate, grad_clip_norm=1.0)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"SFT {model}: {len(FACTS)} made-up facts", disable=not progress)
    for _ in bar:
        fwd_bwd = client.forward_backward(batch, "cross_entropy")
        optim = client.optim_step(adam)
        losses.append(fwd_bwd.result().metrics["loss:sum"] / answer_tokens)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        optim.result()
    after = greedy_answers(client, questions)
    result = FactsResult(before, after, losses)
    for question, old, new in zip(questions, before, after):
        print(f"Q: {question}\n  before: {old}\n  after:  {new}")
    print(
        f"{result.learned}/{len(FACTS)} made-up facts stated exactly after {steps} steps "
        f"(loss/token {losses[0]:.3f} -> {losses[-1]:.3f}); control question "
        f"{'still' if result.kept_control else 'no longer'} answered with {CONTROL[1]!r}; "
        f"{time.time() - started:.0f}s"
    )
    return result


def facts_demo_cli(args) -> int:
    """`tinkerd demo --model MODEL`: exit 0 when every made-up fact is learned and the
    control question still answered (uses --steps, --seed, --no-progress)."""
    result = run_facts_demo(
        args.model, steps=args.steps or 15, seed=args.seed, progress=not args.no_progress
    )
    return 0 if result.learned == len(FACTS) and result.kept_control else 1
