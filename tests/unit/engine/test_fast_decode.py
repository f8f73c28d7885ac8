"""The fast decode path reproduces the Hugging Face forward (and so the HF sampler path)."""

import concurrent.futures

import pytest
import torch
from helpers import TINY, make_datum

from tinkerd.engine import fast_decode
from tinkerd.engine.fast_decode import FastDecoder, unsupported_reason
from tinkerd.engine.sampling.kv_cache import grow_in_place
from tinkerd.engine.sampling.sampler import Sampler
from tinkerd.engine.sampling.spec import BASE_ADAPTER, make_spec
from tinkerd.types import AdamParams, LoraConfig, SamplingParams

PROMPTS = [[256, *b"hello"], [256, *b"a much longer prompt here"], [256, 7], [256, *b"mid len"]]


@pytest.fixture(scope="module")
def adapters(engine):
    """Two sampler adapters trained apart (so they differ from each other and the base)."""
    names = []
    for seed, text in [(0, b"abcabcabc"), (1, b"zyxzyxzyx")]:
        run = engine.create_model(TINY, LoraConfig(rank=8, seed=seed))
        for _ in range(3):
            engine.forward_backward(run, [make_datum([256, *text])])
            engine.optim_step(run, AdamParams(learning_rate=2e-2))
        names.append(engine.save_weights_for_sampler(run).adapter)
    return names


def left_pad(prompts, rows_of):
    width = max(len(prompts[i]) for i in rows_of)
    ids = torch.zeros((len(rows_of), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(rows_of):
        ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
        mask[r, width - len(prompts[i]) :] = 1
    return ids, mask


def test_tiny_is_supported(engine):
    assert unsupported_reason(engine.base_model(TINY).model) is None


@pytest.mark.parametrize("fused", [True, False])
def test_step_logits_equal_the_hf_forward(engine, adapters, fused, monkeypatch):
    """Mixed prompt lengths and a mixed batch of adapters (two LoRAs and the bare base):
    each decode step's logits equal the PEFT model's forward on the same cache, with the
    q/k/v and gate/up weights fused (small models) or not (large ones)."""
    if not fused:
        monkeypatch.setattr(fast_decode, "MAX_FUSED_BYTES", 0)
    base = engine.base_model(TINY)
    rows_of = [0, 1, 2, 3, 1, 0]
    row_adapters = [adapters[0], adapters[1], BASE_ADAPTER, adapters[0], BASE_ADAPTER, adapters[1]]
    ids, mask = left_pad(PROMPTS, rows_of)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    fast = FastDecoder.build(base.model)
    with torch.inference_mode(), base.lock:

        def hf(input_ids, mask, positions, cache=None):
            out = base.peft_model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                adapter_names=row_adapters,
            )
            return out.logits[:, -1], out.cache

        logits, hf_cache = hf(ids, mask, positions)
        _, fast_cache = hf(ids, mask, positions)
        grow_in_place(fast_cache)  # as the sampler's cache: appends in place
        lora = fast.plan(row_adapters, base.device)
        assert (len(fast._fused[0][0]) == 1) == fused  # one (weight, bias) for q, k, v
        position = positions[:, -1]
        for _ in range(6):
            tokens = logits.argmax(-1)
            mask = torch.cat([mask, mask.new_ones((len(rows_of), 1))], 1)
            position = position + 1
            logits, hf_cache = hf(tokens[:, None], mask, position[:, None], hf_cache)
            ours = fast.step(tokens, position, mask, fast_cache, lora)
            torch.testing.assert_close(ours, logits, atol=2e-5, rtol=1e-5)
        # the adapters mattered: rows on different adapters after the same prompt differ
        assert not torch.allclose(logits[1], logits[4], atol=1e-3)


def run(sampler, specs):
    futures = [sampler.submit(spec) for spec in specs]
    return [f.result(timeout=120) for f in futures]


def test_seeded_sampling_matches_the_hf_path(engine, adapters):
    """Same seeds, same tokens with the fast path on and off, for concurrent requests on
    different adapters, prompt lengths and settings; logprobs agree to float32 accuracy."""
    base = engine.base_model(TINY)
    choices = [adapters[0], BASE_ADAPTER, adapters[1], adapters[0]]
    settings = [
        dict(temperature=1.0),
        dict(temperature=0.8, top_p=0.9),
        dict(temperature=1.2, top_k=7),
        dict(temperature=0.0),
    ]
    specs = [
        make_spec(
            base,
            prompt,
            3,
            SamplingParams(max_tokens=20, stop=[], seed=10 + i, **settings[i]),
            adapter=choices[i],
        )
        for i, prompt in enumerate(PROMPTS)
    ]
    results = {}
    for fast in (True, False):
        sampler = Sampler(base, fast_decode=fast)
        assert sampler._fast_on() == fast
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                results[fast] = pool.submit(run, sampler, specs).result()
        finally:
            sampler.close()
    for fast_result, hf_result in zip(results[True], results[False]):
        for a, b in zip(fast_result.sequences, hf_result.sequences):
            assert a.tokens == b.tokens
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
