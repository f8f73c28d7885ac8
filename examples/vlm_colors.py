"""Teach the built-in vision-language model `tinkerd/tiny-vl` to name the colour of an
image: four solid-colour pictures -> "red", "green", "blue", "yellow". Prints the greedy
answer to each before and after training (a random model knows none of them).

    python examples/vlm_colors.py                    # embedded engine
    python examples/vlm_colors.py --base-url http://127.0.0.1:8000 --api-key tml-...
        (a server started with `tinkerd serve --model tinkerd/tiny-vl`)

Each datum is laid out as tinker-cookbook's Qwen3-VL renderer lays out an image:
`<|vision_start|>` + ImageChunk (its `expected_tokens` positions) + `<|vision_end|>`,
then the question and the answer; only the answer's tokens have weight.
"""

from __future__ import annotations

import argparse
import io

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (240, 220, 20),
}
MODEL = "tinkerd/tiny-vl"


def png(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(out, format="PNG")
    return out.getvalue()


def prompt(types, tokenizer, rgb: tuple[int, int, int]):
    """`<|vision_start|>` image `<|vision_end|>` "colour:" as a ModelInput."""
    ids = tokenizer.convert_tokens_to_ids
    return types.ModelInput(
        chunks=[
            types.EncodedTextChunk(tokens=[ids("<|vision_start|>")]),
            types.ImageChunk(data=png(rgb), format="png", expected_tokens=4),
            types.EncodedTextChunk(
                tokens=[
                    ids("<|vision_end|>"),
                    *tokenizer.encode("colour:", add_special_tokens=False),
                ]
            ),
        ]
    )


def datum(types, tokenizer, rgb, name: str):
    """The prompt then " name<|im_end|>", next-token targets, weight on the answer only."""
    question = prompt(types, tokenizer, rgb)
    answer = [*tokenizer.encode(" " + name, add_special_tokens=False), tokenizer.eos_token_id]
    model_input = question
    for token in answer[:-1]:
        model_input = model_input.append_int(token)
    n = model_input.length
    # positions before the answer predict nothing we train; their targets are placeholders
    targets = [0] * (question.length - 1) + answer
    weights = [0.0] * (question.length - 1) + [1.0] * len(answer)
    assert len(targets) == n
    return types.Datum(
        model_input=model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights}
    )


def answers(types, sampler, tokenizer) -> dict[str, str]:
    params = types.SamplingParams(max_tokens=8, temperature=0)
    futures = {
        n: sampler.sample(prompt(types, tokenizer, c), 1, params) for n, c in COLOURS.items()
    }
    return {
        n: tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True).strip()
        for n, f in futures.items()
    }


def main() -> dict[str, tuple[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a tinkerd server (default: embedded engine)")
    parser.add_argument("--api-key")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()

    import tinkerd
    from tinkerd import types

    service = tinkerd.ServiceClient(base_url=args.base_url, api_key=args.api_key)
    client = service.create_lora_training_client(MODEL, rank=8, seed=0)
    tokenizer = client.get_tokenizer()
    data = [datum(types, tokenizer, rgb, name) for name, rgb in COLOURS.items()]

    before = answers(types, client.save_weights_and_get_sampling_client("before"), tokenizer)
    for step in range(args.steps):
        fwd = client.forward_backward(data, "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=args.lr))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {fwd.result().metrics['loss:sum']:.3f}")
    after = answers(types, client.save_weights_and_get_sampling_client("after"), tokenizer)

    right = {"before": 0, "after": 0}
    for name in COLOURS:
        right["before"] += before[name] == name
        right["after"] += after[name] == name
        print(f"{name:>7}: before {before[name]!r:12} after {after[name]!r}")
    print(f"right: {right['before']}/{len(COLOURS)} before, {right['after']}/{len(COLOURS)} after")
    return {name: (before[name], after[name]) for name in COLOURS}


if __name__ == "__main__":
    main()
