"""Sampling: semantics, logprob consistency with training, batching, bad input."""

import concurrent.futures

import pytest
import torch
from helpers import TINY, make_datum

from tinkerd import AdamParams, SamplingParams
from tinkerd.errors import InvalidRequestError, NotFoundError

PROMPTS = [[256, *b"hello"], [256, *b"sampling is fun"], [256, 7]]


def trained_run(service, seed=0, steps=3):
    """A run whose adapter is far from zero, so its samples differ from the base's."""
    client = service.create_lora_training_client(TINY, rank=8, seed=seed)
    data = [make_datum([256, *b"abcabcabc"])]
    for _ in range(steps):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(AdamParams(learning_rate=2e-2))
    return client


def sample(sampler, prompt, n=1, **params):
    return sampler.sample(prompt, n, SamplingParams(**params)).result()


def logprobs_of(result):
    return torch.tensor([s.logprobs for s in result.sequences])


def forward_logprobs(client, prompt, tokens):
    """The training forward's logprob of each of `tokens` after `prompt`."""
    full = prompt + tokens
    out = client.forward([make_datum(full)], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].to_torch()[len(prompt) - 1 :]


def test_greedy_matches_hugging_face_generate(service, engine):
    from transformers import AutoModelForCausalLM

    sampler = service.create_sampling_client(base_model=TINY)
    plain = AutoModelForCausalLM.from_pretrained(engine.base_model(TINY).path)  # no adapters
    for prompt in PROMPTS:
        seq = sample(sampler, prompt, max_tokens=12, temperature=0.0, stop=[]).sequences[0]
        expected = plain.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=258
        )[0, len(prompt) :].tolist()
        assert seq.tokens == expected
        assert seq.stop_reason == "length"


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.3, top_k=5),
        dict(temperature=0.0),
    ],
)
def test_sampled_logprobs_equal_the_training_forward(service, params):
    client = trained_run(service)
    sampler = client.save_weights_and_get_sampling_client()
    for prompt in PROMPTS:
        result = sample(sampler, prompt, 3, max_tokens=16, stop=[], seed=5, **params)
        for seq in result.sequences:
            assert len(seq.logprobs) == len(seq.tokens) == 16
            expected = forward_logprobs(client, prompt, seq.tokens)
            assert torch.allclose(torch.tensor(seq.logprobs), expected, atol=1e-4)


def test_prompt_logprobs_equal_the_training_forward(service):
    client = trained_run(service)
    sampler = client.save_weights_and_get_sampling_client()
    prompt = PROMPTS[1]
    result = sampler.sample(
        prompt,
        1,
        SamplingParams(max_tokens=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
    ).result()
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    expected = forward_logprobs(client, prompt[:1], prompt[1:])
    assert torch.allclose(torch.tensor(result.prompt_logprobs[1:]), expected, atol=1e-4)
    assert sampler.compute_logprobs(prompt).result() == pytest.approx(result.prompt_logprobs)
    for top, actual in zip(result.topk_prompt_logprobs[1:], result.prompt_logprobs[1:]):
        values = [lp for _, lp in top]
        assert len(top) == 3 and values == sorted(values, reverse=True)
        assert values[0] >= actual - 1e-6  # the best token is at least as likely


def test_seed_reproduces_and_varies(service):
    sampler = service.create_sampling_client(base_model=TINY)
    prompt = PROMPTS[0]
    first = sample(sampler, prompt, 4, max_tokens=10, seed=11, stop=[])
    again = sample(sampler, prompt, 4, max_tokens=10, seed=11, stop=[])
    other = sample(sampler, prompt, 4, max_tokens=10, seed=12, stop=[])
    tokens = [s.tokens for s in first.sequences]
    assert tokens == [s.tokens for s in again.sequences]
    assert tokens != [s.tokens for s in other.sequences]
    assert len({tuple(t) for t in tokens}) > 1  # the samples of one request differ


def test_top_k_one_is_greedy(service):
    sampler = service.create_sampling_client(base_model=TINY)
    greedy = sample(sampler, PROMPTS[1], max_tokens=8, temperature=0.0, stop=[])
    top1 = sample(sampler, PROMPTS[1], 2, max_tokens=8, temperature=1.5, top_k=1, stop=[])
    assert all(s.tokens == greedy.sequences[0].tokens for s in top1.sequences)


def test_stop_tokens_strings_and_eos(service, engine):
    sampler = service.create_sampling_client(base_model=TINY)
    prompt = PROMPTS[0]
    greedy = sample(sampler, prompt, max_tokens=10, temperature=0.0, stop=[]).sequences[0]
    third = greedy.tokens[2]
    cut = greedy.tokens.index(third) + 1  # the first occurrence ends the sequence
    by_token = sample(sampler, prompt, max_tokens=10, temperature=0.0, stop=[third])
    assert by_token.sequences[0].tokens == greedy.tokens[:cut]
    assert by_token.sequences[0].stop_reason == "stop"
    decode = engine.base_model(TINY).tokenizer.decode
    text = decode(greedy.tokens[1:3])
    first = next(k for k in range(1, 11) if text in decode(greedy.tokens[:k]))
    by_string = sample(sampler, prompt, max_tokens=10, temperature=0.0, stop=[text])
    assert by_string.sequences[0].tokens == greedy.tokens[:first]  # ends where text appears
    assert by_string.sequences[0].stop_reason == "stop"


def test_default_stop_is_eos(engine):
    """stop=None ends at EOS (made the greedy choice by editing the unembedding row)."""
    base = engine.base_model(TINY)
    weights = engine.sampler_for(base_model=TINY)
    greedy = engine.sample(weights, PROMPTS[0], 1, SamplingParams(max_tokens=4, temperature=0))
    eos, head = 257, base.model.lm_head.weight
    saved = head[eos].clone()
    with torch.no_grad():
        head[eos] = head[greedy.result().sequences[0].tokens[0]] * 1.5
    try:
        params = dict(max_tokens=10, temperature=0.0)
        result = engine.sample(weights, PROMPTS[0], 1, SamplingParams(**params)).result()
        never = engine.sample(weights, PROMPTS[0], 1, SamplingParams(**params, stop=[])).result()
    finally:
        with torch.no_grad():
            head[eos] = saved
    assert result.sequences[0].tokens == [eos] and result.sequences[0].stop_reason == "stop"
    assert len(never.sequences[0].tokens) == 10


def test_sampler_weights_are_a_snapshot(service):
    client = trained_run(service, seed=1)
    frozen = client.save_weights_and_get_sampling_client()
    named = client.save_weights_for_sampler("snap").result().path
    assert named == f"tinker://{client.model_id}/sampler_weights/snap"
    before = sample(frozen, PROMPTS[1], 2, max_tokens=12, seed=3, stop=[])
    for _ in range(3):
        client.forward_backward([make_datum([256, *b"zzzz"])], "cross_entropy")
        client.optim_step(AdamParams(learning_rate=5e-2))
    after = sample(frozen, PROMPTS[1], 2, max_tokens=12, seed=3, stop=[])
    assert [s.tokens for s in before.sequences] == [s.tokens for s in after.sequences]
    assert torch.allclose(logprobs_of(before), logprobs_of(after), atol=1e-5)
    reopened = service.create_sampling_client(model_path=named)
    assert [
        s.tokens for s in sample(reopened, PROMPTS[1], 2, max_tokens=12, seed=3, stop=[]).sequences
    ] == [s.tokens for s in before.sequences]
    live = client.save_weights_and_get_sampling_client()
    moved = sample(live, PROMPTS[1], 2, max_tokens=12, seed=3, stop=[])
    assert not torch.allclose(logprobs_of(moved), logprobs_of(before), atol=1e-3)


def test_concurrent_requests_share_a_batch_with_their_own_adapters(engine):
    """Requests on one base from different runs are decoded together, and each gets the
    same tokens it gets alone (seeded), so every row used its own adapter."""
    from tinkerd import ServiceClient
    from tinkerd.client.transport import InProcessTransport

    service = ServiceClient(transport=InProcessTransport(engine=engine))
    samplers = [trained_run(service, seed=s).save_weights_and_get_sampling_client() for s in (3, 4)]
    samplers.append(service.create_sampling_client(base_model=TINY))
    alone = [
        sample(s, PROMPTS[i], 2, max_tokens=24, seed=i, stop=[]) for i, s in enumerate(samplers)
    ]
    assert alone[0].sequences[0].tokens != alone[1].sequences[0].tokens  # adapters differ
    engine.samplers.samplers[TINY].steps.clear()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(lambda i, s: sample(s, PROMPTS[i], 2, max_tokens=24, seed=i, stop=[]), i, s)
            for _ in range(3)
            for i, s in enumerate(samplers)
        ]
        together = [f.result() for f in futures]
    for k, result in enumerate(together):
        expected = alone[k % 3]
        assert [s.tokens for s in result.sequences] == [s.tokens for s in expected.sequences]
    most = max(requests for _, requests in engine.sampler_stats(TINY))
    assert most >= 3  # at least three requests advanced in one forward pass


@pytest.mark.parametrize(
    "prompt, n, params, match",
    [
        ([], 1, dict(max_tokens=4), "empty"),
        ([256, 9999], 1, dict(max_tokens=4), "outside"),
        ([256], 1, dict(max_tokens=0), "max_tokens"),
        ([256], 10_000, dict(max_tokens=4), "num_samples"),
        ([256], 1, dict(max_tokens=4, top_p=0.0), "top_p"),
        ([256], 1, dict(max_tokens=4, top_p=1.5), "top_p"),
        ([256], 1, dict(max_tokens=4, temperature=-1.0), "temperature"),
        ([256], 1, dict(max_tokens=4096), "context"),
        ([256], 1, dict(max_tokens=4, stop=[5000]), "stop"),
    ],
)
def test_bad_sample_requests_are_refused(service, prompt, n, params, match):
    sampler = service.create_sampling_client(base_model=TINY)
    with pytest.raises(InvalidRequestError, match=match):
        sampler.sample(prompt, n, SamplingParams(**params)).result()
    assert sample(sampler, [256, 1], max_tokens=2).sequences  # still serving


def test_unknown_sampler_weights(service):
    with pytest.raises(NotFoundError):
        service.create_sampling_client(model_path="tinker://nope/sampler_weights/x").sample(
            [256], 1, SamplingParams(max_tokens=2)
        ).result()
