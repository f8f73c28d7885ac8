"""Inference as a bounded path (issue 25): one admission for every sample, turns by key in
the sampler, cancellation, live streaming, a body limit and nothing heavy on the event loop.

Each test is a regression test for one finding of the audit; they use the session's
engine, with the server in this process (uvicorn on a thread) where the sampler must be
looked at while a real client streams or goes away.
"""

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from helpers import KEYS, TINY, free_port

from tinkerd.engine.sampling.sampler import HEAP_SHARE, PREFILL_SHARE, Sampler
from tinkerd.engine.sampling.spec import make_spec
from tinkerd.engine.tiny_chat import TINY_CHAT_MODEL_NAME
from tinkerd.errors import InvalidRequestError, QueueFullError
from tinkerd.server.app import Server, create_app, fingerprint
from tinkerd.service import ServiceConfig
from tinkerd.service.inference import ChatCompletionRequest, parse
from tinkerd.service.inference.openai import chat_messages
from tinkerd.types import SamplingParams

BOS = 256
CHAT = TINY_CHAT_MODEL_NAME
LONG = SamplingParams(max_tokens=1500, stop=[], temperature=1.0, seed=0)


def sampler_of(engine) -> Sampler:
    weights = engine.sampler_for(base_model=TINY)
    engine.sample(weights, [BOS], 1, SamplingParams(max_tokens=1)).result()
    return engine.samplers.samplers[TINY]


def wait_for(predicate, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def live(engine, tmp_path) -> Iterator[Server]:
    """A server on the session's engine, served by uvicorn on a thread (loopback)."""
    import uvicorn

    server = Server(engine, tmp_path, list(KEYS), [TINY, CHAT], config=ServiceConfig())
    port = free_port()
    config = uvicorn.Config(create_app(server), port=port, log_level="warning")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    assert wait_for(lambda: runner.started)
    server.url = f"http://127.0.0.1:{port}"
    yield server
    runner.should_exit = True
    thread.join(10)


def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/oai/api/v1", api_key=KEYS[0], max_retries=0)


# ---------------------------------------------------------------- admission


def test_a_compatible_request_is_admitted_whole_for_its_key_before_it_is_queued(engine, tmp_path):
    """Audit: a 4,200-prompt completions request got a 429 but its prompts ran anyway, and
    --max-queued-per-key never applied (the route did not pass the key on)."""
    from starlette.testclient import TestClient

    config = ServiceConfig(max_queued_per_key=4, max_pending=6)
    server = Server(engine, tmp_path, list(KEYS), [TINY], config=config)
    client = TestClient(create_app(server))
    sampler = sampler_of(engine)
    alice = fingerprint(KEYS[0])
    weights = engine.sampler_for(base_model=TINY)
    # 3 requests of 64 samples x 1500 tokens: they run for the whole test
    held = server.service.sampling.sample_many(alice, weights, [[BOS]] * 3, 64, LONG)

    def post(key: str, prompts: int):
        body = {"model": TINY, "prompt": [[BOS, 97]] * prompts, "max_tokens": 4}
        return client.post(
            "/oai/api/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )

    try:
        more = post(KEYS[0], 2)  # 3 + 2 > the key's 4
        assert more.status_code == 429 and "--max-queued-per-key" in more.text
        never = post(KEYS[0], 5)  # more than the key may ever queue: not worth a retry
        assert never.status_code == 400 and "--max-queued-per-key" in never.text
        full = post(KEYS[1], 4)  # 3 + 4 > the server's 6, refused before queueing
        assert full.status_code == 429 and "--max-queue" in full.text
        assert server.service.queue._pending == 3  # only the 3 held: nothing else queued
        assert {j.spec.tenant for j in sampler._waiting()} <= {alice}
        assert post(KEYS[1], 3).status_code == 200  # what fits still runs
    finally:
        for future in held:
            future.cancel()
    assert wait_for(lambda: not sampler._rows)  # cancelled: they stopped decoding
    assert server.service.queue._pending == 0


def test_another_keys_prompt_joins_the_batch_within_a_step(engine):
    """Audit: a victim's SamplingClient.sample waited 136 s behind another key's flood.
    Here a key fills an 8-row batch and queues 40 requests of 60 tokens; another key's
    3-token request is done within a few steps, not after the flood's 300."""
    sampler = Sampler(engine.base_model(TINY), max_batch_rows=8)
    sampler.latency_rows = None  # turns alone (the row cap: the test below)
    base = engine.base_model(TINY)
    try:
        flood = [
            sampler.submit(make_spec(base, [BOS, 97 + i % 20], 1, LONG, tenant="flood"))
            for i in range(40)
        ]
        assert wait_for(lambda: len(sampler.steps) >= 2)
        params = SamplingParams(max_tokens=3, stop=[], seed=1)
        start = len(sampler.steps)
        victim = sampler.submit(make_spec(base, [BOS, 98], 1, params, tenant="victim"))
        victim.result(timeout=60)
        steps = [rows for rows, _ in list(sampler.steps)[start:]]
        assert steps.index(9) <= 1  # it joined the flood's 8 rows within a step
        assert steps.count(9) == 3  # and decoded its 3 tokens in the next 3
        assert len(victim.result().sequences[0].tokens) == 3
        assert max(rows for rows, _ in sampler.recent_steps()) <= 8 + sampler.newcomer_rows
    finally:
        for future in flood:
            future.cancel()
        sampler.close()


def test_a_light_key_decodes_in_small_steps_and_parked_rows_resume_unchanged(engine):
    """A step's cost grows with its rows on a CPU (issue 25: a one-row request was 18x
    slower beside another key's 256 rows). While a light key (a request of one row) is
    active, the heavy key's rows beyond `latency_rows` are parked with their KV cache and
    merged back afterwards: the light key's steps have at most `latency_rows` rows, and
    the heavy key's seeded samples are the very tokens (and logprobs) they are alone."""
    base = engine.base_model(TINY)

    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=24, stop=[], seed=seed)

    specs = [
        make_spec(base, [BOS, *f"heavy {i}".encode()], 1, params(i), tenant="heavy")
        for i in range(12)
    ]
    alone = Sampler(base)
    try:
        futures = [alone.submit(spec) for spec in specs]  # one batch: a seed fixes a sample
        expected = [future.result(60).sequences[0] for future in futures]
    finally:
        alone.close()
    sampler = Sampler(base)
    sampler.latency_rows = 4
    try:
        heavy = [sampler.submit(spec) for spec in specs]
        assert wait_for(lambda: len(sampler.steps) >= 3)
        assert max(rows for rows, _ in sampler.recent_steps()) == 12  # all of them at once
        start = len(sampler.steps)
        params = SamplingParams(max_tokens=5, stop=[], seed=1)
        light = sampler.submit(make_spec(base, [BOS, 98], 1, params, tenant="light"))
        assert len(light.result(60).sequences[0].tokens) == 5
        shared = [rows for rows, _ in list(sampler.steps)[start:]]
        assert max(shared[1:6]) <= 4  # from the step it joined on, the batch kept to the cap
        for future, want in zip(heavy, expected):
            got = future.result(60).sequences[0]
            assert got.tokens == want.tokens
            assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) < 1e-5
        assert not sampler._parked
    finally:
        sampler.close()


def test_many_light_keys_do_not_starve_a_heavy_one(engine):
    """Five light keys fill a 4-row cap by themselves; the heavy key still keeps
    `light_rows` rows decoding, and finishes its short samples before their long ones."""
    base = engine.base_model(TINY)
    sampler = Sampler(base)
    sampler.latency_rows = 4  # light: at most 2 rows
    try:
        short = SamplingParams(max_tokens=10, stop=[], seed=0)
        heavy = [
            sampler.submit(make_spec(base, [BOS, 97 + i], 1, short, tenant="heavy"))
            for i in range(4)
        ]
        long = SamplingParams(max_tokens=40, stop=[], seed=1)
        lights = [
            sampler.submit(make_spec(base, [BOS, 98], 1, long, tenant=f"light {i}"))
            for i in range(5)
        ]
        lights[0].result(120)
        assert all(f.done() for f in heavy)
        assert all(len(f.result().sequences[0].tokens) == 10 for f in heavy)
    finally:
        sampler.close()


def test_parked_rows_that_are_cancelled_never_come_back(engine):
    base = engine.base_model(TINY)
    sampler = Sampler(base)
    sampler.latency_rows = 2
    try:
        heavy = [
            sampler.submit(make_spec(base, [BOS, 97 + i], 1, LONG, tenant="heavy"))
            for i in range(6)
        ]
        assert wait_for(lambda: len(sampler._rows) == 6)
        params = SamplingParams(max_tokens=20, stop=[], seed=1)
        light = sampler.submit(make_spec(base, [BOS, 98], 1, params, tenant="light"))
        assert wait_for(lambda: sampler._parked)
        for future in heavy:
            future.cancel()
        assert len(light.result(120).sequences[0].tokens) == 20
        assert wait_for(lambda: not sampler._rows and not sampler._parked, 10)
    finally:
        sampler.close()


def test_a_sampling_client_beside_an_openai_flood_decodes_in_small_steps(live, engine):
    """Issue 25: another key's SamplingClient.sample was 4-19x slower than alone while a
    key flooded the OpenAI route: it joined the batch at once, but every step it shared
    carried the flood's rows. Now the flood's rows over `latency_rows` are parked while
    the victim (official `tinker` SDK) samples, and the flood (official `openai` client)
    finishes afterwards."""
    import tinker

    sampler = sampler_of(engine)
    cap = sampler.latency_rows
    assert cap is not None  # a CPU
    # a light tenant of an earlier test on this engine still caps the batch for LINGER s
    time.sleep(max(0.0, sampler._light_until - time.monotonic()))
    prompts = [[BOS, 97 + i % 20] for i in range(3 * cap)]
    client = openai.OpenAI(base_url=f"{live.url}/oai/api/v1", api_key=KEYS[0], max_retries=0)
    done: list = []
    flood = threading.Thread(
        target=lambda: done.append(
            client.completions.create(model=TINY, prompt=prompts, max_tokens=30, temperature=1.0)
        )
    )
    flood.start()
    # the flood decoding, far over the cap (a row may sample its stop token at once, so
    # all of them need not be in the batch at one moment)
    assert wait_for(lambda: len(sampler._rows) >= 2 * cap)
    victim = tinker.ServiceClient(base_url=live.url, api_key=KEYS[1])
    sampling = victim.create_sampling_client(base_model=TINY).result()
    start = len(sampler.steps)
    params = tinker.types.SamplingParams(max_tokens=4, stop=[], seed=0)
    out = sampling.sample(tinker.types.ModelInput.from_ints([BOS, 98]), 1, params).result()
    assert len(out.sequences[0].tokens) == 4
    shared = [rows for rows, _ in list(sampler.steps)[start:]]
    assert cap in shared  # its steps: the cap (its row and the flood's oldest), not 25 rows
    flood.join(120)
    assert len(done[0].choices) == len(prompts)  # the parked rows finished too
    assert {c.finish_reason for c in done[0].choices} <= {"stop", "length"}


def test_a_cancelled_request_stops_decoding_within_a_step(engine):
    sampler = Sampler(engine.base_model(TINY))
    base = engine.base_model(TINY)
    try:
        future = sampler.submit(make_spec(base, [BOS, 97], 8, LONG))
        assert wait_for(lambda: len(sampler.steps) >= 3)
        future.cancel()
        at_cancel = len(sampler.steps)
        assert wait_for(lambda: not sampler._rows)
        assert len(sampler.steps) - at_cancel <= 2
    finally:
        sampler.close()


# ---------------------------------------------------------------- streaming, cancellation


def test_openai_streams_tokens_as_they_are_sampled(live, engine):
    """Audit: stream=true sent every event at the end (first chunk at 6.15 s of 6.17 s)."""
    sampler = sampler_of(engine)
    stream = oai(live).completions.create(
        model=TINY, prompt=[BOS, 97], max_tokens=60, temperature=1.0, seed=3, stream=True
    )
    chunks, decoding_at_first = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and decoding_at_first is None:
            decoding_at_first = bool(sampler._rows)  # the request is still decoding
        chunks.append(chunk)
    assert decoding_at_first
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and len(text) > 5


def test_anthropic_stream_matches_the_whole_answer(live):
    import anthropic

    client = anthropic.Anthropic(base_url=f"{live.url}/anthropic/api", api_key=KEYS[0])
    ask = dict(model=CHAT, max_tokens=12, messages=[{"role": "user", "content": "Hi"}])
    whole = client.messages.create(**ask, extra_body={"temperature": 0})
    with client.messages.stream(**ask, extra_body={"temperature": 0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (
        whole.stop_reason,
        whole.usage.output_tokens,
    )


def test_a_streaming_client_that_goes_away_stops_decoding(live, engine):
    """Audit: after a streaming client disconnected, the server spent 27 CPU-seconds
    finishing n=64, max_tokens=1500."""
    sampler = sampler_of(engine)
    body = {"model": TINY, "prompt": [BOS, 97], "max_tokens": 1500, "n": 16, "stream": True}
    with httpx.Client(timeout=30) as http:
        headers = {"Authorization": f"Bearer {KEYS[0]}"}
        with http.stream(
            "POST", f"{live.url}/oai/api/v1/completions", json=body, headers=headers
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())
            assert sampler._rows
    at_close = len(sampler.steps)
    assert wait_for(lambda: not sampler._rows, 30)
    assert len(sampler.steps) - at_close < 50  # of 1500


def test_a_waiting_client_that_goes_away_stops_decoding(live, engine):
    sampler = sampler_of(engine)
    body = {"model": TINY, "prompt": [BOS, 97], "max_tokens": 1500, "n": 16}
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/oai/api/v1/completions", json=body, headers=headers, timeout=1)
    at_close = len(sampler.steps)
    assert wait_for(lambda: not sampler._rows, 30)
    assert len(sampler.steps) - at_close < 50


# ---------------------------------------------------------------- the event loop, bodies


def test_a_huge_prompt_does_not_block_the_server(live):
    """Audit: a 20 MB prompt was tokenized on the event loop (every route, health checks
    included, froze for ~22 s). A health check sent while a 500 KB prompt is decoded and
    tokenized (count_tokens: nothing but that) answers in a fraction of that request's time
    (on today's main, one waits for it whole)."""
    headers = {"x-api-key": KEYS[0], "anthropic-version": "2023-06-01"}
    body = {"model": CHAT, "messages": [{"role": "user", "content": "ab" * 250_000}]}

    async def race() -> tuple[httpx.Response, float, float]:
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            small = {"model": CHAT, "messages": [{"role": "user", "content": "ab"}]}
            url = "/anthropic/api/v1/messages/count_tokens"
            assert (await http.post(url, json=small, headers=headers)).status_code == 200
            start = time.monotonic()  # the model is loaded: the request is its tokenizing
            big = asyncio.ensure_future(http.post(url, json=body, headers=headers))
            slowest = 0.0  # health checks one after another while the big request runs
            while not big.done():
                asked = time.monotonic()
                assert (await http.get("/api/v1/healthz")).status_code == 200
                slowest = max(slowest, time.monotonic() - asked)
            return big.result(), slowest, time.monotonic() - start

    answer, health_seconds, big_seconds = asyncio.run(race())
    assert answer.status_code == 200 and answer.json()["input_tokens"] > 500_000
    assert health_seconds < 0.5 * big_seconds, (health_seconds, big_seconds)


def test_bodies_over_the_limit_are_a_413(engine, tmp_path):
    from starlette.testclient import TestClient

    config = ServiceConfig(max_body_bytes=10_000)
    client = TestClient(create_app(Server(engine, tmp_path, list(KEYS), [TINY], config=config)))
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"model": TINY, "prompt": "x" * 20_000, "max_tokens": 1}
    big = client.post("/oai/api/v1/completions", json=body, headers=headers)
    assert big.status_code == 413 and "--max-body-bytes" in big.text

    def chunked() -> Iterator[bytes]:
        yield b'{"model": "tinkerd/tiny", "prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    streamed = client.post("/oai/api/v1/completions", content=chunked(), headers=headers)
    assert streamed.status_code == 413
    small = {"model": TINY, "prompt": "x", "max_tokens": 1}
    assert client.post("/oai/api/v1/completions", json=small, headers=headers).status_code == 200


# ---------------------------------------------------------------- smaller


def test_developer_messages_are_system_messages():
    """Audit: role "developer" reached the chat template as is (OpenAI: = system)."""
    body = {"model": "m", "messages": [{"role": "developer", "content": "Be brief."}]}
    assert chat_messages(parse(ChatCompletionRequest, body))[0]["role"] == "system"


def test_unsupported_compatible_routes_are_json_404s_in_the_apis_shape(engine, tmp_path):
    """Audit: POST /responses (inspect-ai's default) was a plain 404."""
    from starlette.testclient import TestClient

    client = TestClient(create_app(Server(engine, tmp_path, list(KEYS), [TINY])))
    body = {"model": TINY, "input": "hi"}
    out = client.post("/oai/api/v1/responses", json=body)
    assert out.status_code == 404
    assert out.json()["error"]["type"] == "not_found_error"
    assert "/responses" in out.json()["error"]["message"]
    other = client.post("/anthropic/api/v1/complete", json=body)
    assert other.status_code == 404 and other.json()["type"] == "error"


def test_a_request_larger_than_any_bound_is_refused_by_name(engine):
    from tinkerd.service import Service

    service = Service(engine, config=ServiceConfig(max_queued_per_key=2), recover=False)
    weights = engine.sampler_for(base_model=TINY)
    with pytest.raises(InvalidRequestError, match="--max-queued-per-key"):
        service.sampling.sample_many("k", weights, [[BOS]] * 3, 1, LONG)
    held = service.sampling.sample_many("k", weights, [[BOS]] * 2, 1, LONG)
    with pytest.raises(QueueFullError):
        service.sampling.sample(weights, [BOS], 1, LONG, owner="k")
    for future in held:
        future.cancel()
    service.close()


# ---------------------------------------------------------------- inflight sampling clients


def test_inflight_sampling_clients_share_the_newest_weights(server):
    """Audit: kind="inflight" was refused (422). SDK 0.38's contract: every inflight
    client of a run samples its newest inflight save; a snapshot client keeps its own."""
    import tinker
    from helpers import sdk_datum
    from tinker import types

    sdk = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
    try:
        run = sdk.create_lora_training_client(base_model=TINY, rank=8, seed=0).result()
        prompt = types.ModelInput.from_ints([BOS, *b"inflight"])

        def logprobs(client) -> list[float]:
            return client.compute_logprobs(prompt).result()[1:]

        early = run.save_weights_and_get_sampling_client(kind="inflight").result()
        snapshot = run.save_weights_and_get_sampling_client().result()
        before = logprobs(early)
        assert logprobs(snapshot) == pytest.approx(before, abs=1e-5)
        for _ in range(3):
            run.forward_backward([sdk_datum(b"inflight")], "cross_entropy")
            run.optim_step(types.AdamParams(learning_rate=2e-3))
        late = run.save_weights_and_get_sampling_client(kind="inflight").result()
        after = logprobs(late)
        assert sum(after) > sum(before) + 1  # trained on the prompt: it became likelier
        assert logprobs(late) == pytest.approx(after, abs=1e-5)
        assert logprobs(early) == pytest.approx(after, abs=1e-5)  # the made-before client
        assert logprobs(snapshot) == pytest.approx(before, abs=1e-5)  # a snapshot stays
    finally:
        sdk.close("success").result()


def test_the_sdks_get_tokenizer_works_offline_for_a_model_served_from_a_file(tmp_path):
    """Audit: get_tokenizer() for SmolLM2 served from its GGUF asked the hub for
    HuggingFaceTB/SmolLM2-135M-Instruct (OSError offline, even with HF_HUB_OFFLINE=1).
    Loading such a model offers its tokenizer in the hub cache under the hub id; the SDK's
    own loader then finds it offline. (tiny-chat's files stand in for the GGUF's here.)"""
    import os
    import subprocess
    import sys

    from tinkerd.engine.tiny_chat import tiny_chat_model_dir

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    hub_id = "example-org/served-from-a-file"
    script = f"""
from pathlib import Path
from tinkerd.engine.models import offer_tokenizer_offline, _hub_usable
from tinker.lib.public_interfaces.sampling_client import _load_tokenizer_from_model_info
from transformers import AutoTokenizer
snapshot = offer_tokenizer_offline({hub_id!r}, Path({str(tiny_chat_model_dir())!r}))
assert snapshot is not None and not _hub_usable({hub_id!r})  # no model there, only its tokenizer
sdk = _load_tokenizer_from_model_info("x", {hub_id!r})
ours = AutoTokenizer.from_pretrained({str(tiny_chat_model_dir())!r})
text = "<|start_header_id|>user<|end_header_id|> hi"
assert sdk.encode(text) == ours.encode(text) and sdk.chat_template == ours.chat_template
assert offer_tokenizer_offline({hub_id!r}, Path(".")) is None  # there already
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ---------------------------------------------------------------- the sampling memory budget


def test_the_batch_kv_cache_stays_within_the_sampling_budget(engine):
    """Audit: no memory bound for sampling (each concurrent ~2,000-token prompt added
    ~40 MiB). Rows join while the cache bound fits; a request that never could is a 400."""
    sampler = Sampler(engine.base_model(TINY))
    base = engine.base_model(TINY)
    params = SamplingParams(max_tokens=40, stop=[], seed=0)
    prompt = [BOS, *b"budget"]
    one_row = sampler.kv_bytes(1, len(prompt) + 40)
    sampler.kv_budget = int(3 * one_row / 0.8 / (1 - PREFILL_SHARE - HEAP_SHARE))  # 3 rows
    try:
        with pytest.raises(InvalidRequestError, match="--sampling-memory-budget"):
            sampler.submit(make_spec(base, prompt, 5, params))
        futures = [sampler.submit(make_spec(base, prompt, 1, params)) for _ in range(8)]
        assert all(len(f.result(60).sequences[0].tokens) == 40 for f in futures)
        assert max(rows for rows, _ in sampler.recent_steps()) == 3
        assert sampler.kv_bytes(3, len(prompt) + 40) <= sampler.cache_budget
    finally:
        sampler.close()
    # keys and values x 4 layers x 4 key/value heads x 32 dims x float32
    assert sampler.kv_per_token == 2 * 4 * 4 * 32 * 4


def test_long_prompts_are_prefilled_in_chunks_with_the_same_logprobs(engine):
    """A prefill's working memory counts in the sampling budget: prompts that would not
    fit its share in one forward are prefilled in groups of rows and chunks of tokens,
    each chunk attending to the cache of the ones before. Prompt logprobs (and their
    top-k), sampled tokens and their logprobs are those of the one-forward prefill."""
    base = engine.base_model(TINY)
    prompts = [[BOS, *f"p{i} ".encode() * 30][:n] for i, n in enumerate([5, 37, 50, 64])]

    def run(budget: int | None) -> tuple[list, int]:
        sampler = Sampler(base)
        sampler.kv_budget = budget
        try:
            futures = [
                sampler.submit(
                    make_spec(
                        base,
                        prompt,
                        2,
                        SamplingParams(max_tokens=8, stop=[], seed=i),
                        prompt_logprobs=True,
                        topk_prompt_logprobs=3,
                    )
                )
                for i, prompt in enumerate(prompts)
            ]
            return [f.result(60) for f in futures], sampler.prefill_forwards
        finally:
            sampler.close()

    whole, forwards = run(None)
    assert forwards == 1
    probe = Sampler(base)
    two_rows_of_16 = probe.prefill_bytes(2, 16, 64, True)
    probe.close()
    chunked, forwards = run(int(two_rows_of_16 / PREFILL_SHARE) + 1)
    assert forwards == 3 + 4  # rows 2 at a time: 37 tokens in 3 chunks, then 64 in 4
    for a, b in zip(whole, chunked):
        assert max(abs(x - y) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])) < 1e-5
        top = [[t for t, _ in pairs] for pairs in a.topk_prompt_logprobs[1:]]
        assert top == [[t for t, _ in pairs] for pairs in b.topk_prompt_logprobs[1:]]
        for x, y in zip(a.sequences, b.sequences):
            assert x.tokens == y.tokens
            assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-5


def test_a_prompt_whose_prefill_can_never_fit_is_refused_by_name(engine):
    """A request whose prefill's smallest forward (one row, 16 tokens; all logits when
    prompt logprobs are asked for) exceeds the budget's prefill share is a 400 naming it."""
    sampler = Sampler(engine.base_model(TINY))
    base = engine.base_model(TINY)
    prompt = [BOS, *b"x" * 200]
    sampler.kv_budget = int(sampler.prefill_bytes(1, 16, len(prompt), False) / PREFILL_SHARE) + 4
    assert sampler.prefill_bytes(1, 16, len(prompt), True) > sampler.prefill_budget
    assert sampler.kv_bytes(1, len(prompt) + 8) <= sampler.cache_budget
    params = SamplingParams(max_tokens=8, stop=[])
    try:
        with pytest.raises(InvalidRequestError, match="prefill; tinkerd serve --sampling-memory"):
            sampler.submit(make_spec(base, prompt, 1, params, prompt_logprobs=True))
        assert sampler.submit(make_spec(base, prompt, 1, params)).result(60).sequences
    finally:
        sampler.close()


def test_a_sample_of_an_ended_session_stops_decoding(engine, tmp_path):
    """A request whose future will never be read (its session ended) stops decoding."""
    from tinkerd.requests import CreateSamplingSessionRequest, SampleRequest
    from tinkerd.service import Service
    from tinkerd.service.caller import KeyCaller
    from tinkerd.types import ModelInput

    service = Service(engine, tmp_path, [TINY], recover=False)
    caller, sampler = KeyCaller("k"), sampler_of(engine)
    session = service.sessions.create("k", [], {})
    opened = service.submit(
        caller,
        CreateSamplingSessionRequest(
            session_id=session, sampling_session_seq_id=0, base_model=TINY
        ),
    )
    sampling_id = (opened.result() if hasattr(opened, "result") else opened).sampling_session_id
    body = dict(max_tokens=1500, stop=[], temperature=1.0, seed=0)
    future = service.submit(
        caller,
        SampleRequest(
            sampling_session_id=sampling_id,
            num_samples=16,
            prompt=ModelInput.from_ints([BOS, 97]),
            sampling_params=body,
        ),
    )
    assert wait_for(lambda: len(sampler._rows) == 16)
    service.sessions.finish(session, "k")
    at_end = len(sampler.steps)
    assert wait_for(lambda: not sampler._rows, 30) and len(sampler.steps) - at_end <= 2
    assert future.cancelled() and service.queue._pending == 0
    service.close()


def test_a_stream_sends_whole_characters_and_nothing_of_a_stop_string():
    """The streamed pieces: never half a UTF-8 character, never text that turns out to
    start a stop string, nothing after one (or after EOS)."""
    from tinkerd.engine.tiny import build_tokenizer
    from tinkerd.service.inference.generate import Detokenizer, Stops

    plain = Detokenizer(build_tokenizer(), Stops({257}, []))
    pieces = [plain.add(t) for t in "hé!".encode()]
    assert pieces == ["h", "", "é", "!"]  # the first byte of é waits for the second
    text = Detokenizer(build_tokenizer(), Stops({257}, [", w"]))
    pieces = [text.add(t) for t in "héllo, world".encode()]
    assert pieces[:4] == ["", "", "", "h"]  # 2 characters held: ", w" minus one
    assert "".join(pieces) == "héllo" and text.ended
    assert text.rest("héllo") == ""
    eos = Detokenizer(build_tokenizer(), Stops({257}, []))
    assert [eos.add(t) for t in [*b"ok", 257, *b"no"]] == ["o", "k", "", "", ""]


def test_the_latency_cap_is_set_by_the_serve_flag(tmp_path):
    """`--sampling-latency-rows N|none|auto` reaches each base's sampler."""
    from tinkerd.cli import build_parser
    from tinkerd.cli.serve import engine_config
    from tinkerd.engine import Engine

    for flag, rows in [("3", 3), ("none", None), ("auto", 8)]:
        args = build_parser().parse_args(["serve", "--sampling-latency-rows", flag])
        engine = Engine(data_dir=tmp_path / flag, config=engine_config(args))
        weights = engine.sampler_for(base_model=TINY)
        engine.sample(weights, [BOS], 1, SamplingParams(max_tokens=1)).result()
        sampler = engine.samplers.samplers[TINY]
        try:
            assert sampler.latency_rows == rows  # auto: a CPU's default
        finally:
            sampler.close()
