"""A small evaluation over tinkerd's OpenAI-compatible API, the way harnesses do it.

Runs offline against a local `tinkerd serve` (no dataset download, no hosted model):

    tinkerd serve --api-key my-key --model tinkerd/tiny-chat &
    python examples/openai_eval.py --base-url http://127.0.0.1:8000 --api-key my-key

1. Multiple choice by log-likelihood, as lm-evaluation-harness's `local-completions`
   model asks for it: `/completions` with `echo=true, max_tokens=1, logprobs=1,
   temperature=0`, then the logprobs of the answer's tokens summed (here found by
   `text_offset`, so no tokenizer is needed on this side).
2. Free generation with stop strings (a harness's `generate_until`) through
   `/chat/completions`, the prompt rendered by the model's own chat template.

`--model` may also be a checkpoint: `tinker://<run>/sampler_weights/<name>`.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI

QUESTIONS = [
    ("Q: What color is the sky on a clear day?\nA:", [" blue", " green", " loud"], 0),
    ("Q: How many legs does a cat have?\nA:", [" four", " seven", " none"], 0),
    ("Q: Which one is a fruit?\nA:", [" a chair", " an apple", " a cloud"], 1),
    ("Q: What do bees make?\nA:", [" honey", " bricks", " glass"], 0),
]


def answer_logprob(client: OpenAI, model: str, context: str, answer: str) -> float:
    """log p(answer | context): the logprobs of the tokens that start inside `answer`."""
    out = client.completions.create(
        model=model,
        prompt=context + answer,
        echo=True,
        max_tokens=1,  # the one sampled token is ignored, as in lm-evaluation-harness
        logprobs=1,
        temperature=0,
    )
    lp = out.choices[0].logprobs
    end = len(context + answer)
    return sum(
        value
        for value, offset in zip(lp.token_logprobs, lp.text_offset)
        if len(context) <= offset < end and value is not None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", ""))
    parser.add_argument("--model", default="tinkerd/tiny", help="for the log-likelihood task")
    parser.add_argument("--chat-model", default="tinkerd/tiny-chat", help="for generation")
    args = parser.parse_args()
    client = OpenAI(base_url=f"{args.base_url}/oai/api/v1", api_key=args.api_key)

    correct = 0
    for context, choices, gold in QUESTIONS:
        scores = [answer_logprob(client, args.model, context, c) for c in choices]
        best = max(range(len(choices)), key=scores.__getitem__)
        correct += best == gold
        shown = ", ".join(f"{c.strip()}={s:.2f}" for c, s in zip(choices, scores))
        print(f"{context.splitlines()[0]}  [{shown}] -> {choices[best].strip()}")
    print(f"multiple-choice accuracy: {correct}/{len(QUESTIONS)}")

    chat = client.chat.completions.create(
        model=args.chat_model,
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=24,
        temperature=0,
        stop=["\n\n"],
    )
    choice = chat.choices[0]
    print(f"generation ({choice.finish_reason}, {chat.usage.completion_tokens} tokens): ", end="")
    print(repr(choice.message.content))


if __name__ == "__main__":
    main()
