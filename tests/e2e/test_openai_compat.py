"""OpenAI- and Anthropic-compatible inference, through the official `openai` and
`anthropic` packages, unmodified, against a real `tinkerd serve` on loopback; compared
with the official `tinker` SDK's SamplingClient on the same server."""

import json

import anthropic
import httpx
import openai
import pytest
import tinker
from helpers import KEYS, ROOT, TINY, ServerProcess
from tinker import types

from tinkerd.engine.tiny import build_tokenizer
from tinkerd.engine.tiny_chat import TINY_CHAT_MODEL_NAME, build_chat_tokenizer
from tinkerd.errors import InvalidRequestError
from tinkerd.service import inference as api
from tinkerd.service.inference import common, generate, logprobs
from tinkerd.service.inference.openai import chat_messages
from tinkerd.types import SampledSequence

CHAT = TINY_CHAT_MODEL_NAME
BOS, START, END, EOT = 256, 258, 259, 260  # tiny-chat's Llama 3 special tokens
GREEDY = types.SamplingParams(max_tokens=12, temperature=0.0)
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """`tinkerd serve` with tinkerd/tiny and tinkerd/tiny-chat."""
    proc = ServerProcess(tmp_path_factory.mktemp("oai-data"), "--model", CHAT)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def sdk(chat_server):
    client = tinker.ServiceClient(base_url=chat_server.url, api_key=KEYS[0])
    yield client
    client.close("success").result()


def oai(server, key=KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/oai/api/v1", api_key=key, max_retries=0)


def claude(server, key=KEYS[0]) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{server.url}/anthropic/api", api_key=key, max_retries=0)


def sdk_greedy(sdk, prompt: list[int], base=None, path=None, max_tokens=12):
    sampler = sdk.create_sampling_client(base_model=base, model_path=path).result()
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0]


def chat_tokens(messages) -> list[int]:
    tokenizer = build_chat_tokenizer()
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def test_completion_greedy_equals_sampling_client(chat_server, sdk):
    prompt = [BOS, *b"The quick brown"]
    expected = sdk_greedy(sdk, prompt, base=TINY)
    out = oai(chat_server).completions.create(
        model=TINY, prompt=prompt, max_tokens=12, temperature=0, logprobs=0
    )
    (choice,) = out.choices
    n = len(expected.tokens)
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.completion_tokens == n
    assert choice.finish_reason == ("length" if n == 12 else "stop")
    # byte-level tokenizer: token k's text starts at byte k; its logprob is the SDK's
    assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert choice.text == build_tokenizer().decode(expected.tokens, skip_special_tokens=True)
    # the same prompt as a string gives the same tokens
    again = oai(chat_server).completions.create(
        model=TINY, prompt=bytes(prompt[1:]).decode(), max_tokens=4, temperature=0
    )
    assert again.usage.prompt_tokens == len(prompt) - 1  # no BOS: the tokenizer adds none


def test_chat_renders_the_template_token_for_token(chat_server, sdk):
    rendered = chat_tokens(HI)
    # Llama 3's format, written out by hand
    header = lambda role: [START, *role.encode(), END, 10, 10]
    assert rendered == [BOS, *header("user"), *b"Hi", EOT, *header("assistant")]
    expected = sdk_greedy(sdk, rendered, base=CHAT)
    out = oai(chat_server).chat.completions.create(
        model=CHAT, messages=HI, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    (choice,) = out.choices
    assert out.usage.prompt_tokens == len(rendered)
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(
        expected.logprobs[: len(choice.logprobs.content)], abs=1e-4
    )
    for entry, token in zip(choice.logprobs.content, expected.tokens):
        if token < 256:  # a byte token's bytes are that byte, even mid-character
            assert entry.bytes == [token]
    for entry in choice.logprobs.content:  # greedy: the chosen token is the most likely
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)


def test_chat_without_a_template_is_a_clear_400(chat_server):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        oai(chat_server).chat.completions.create(model=TINY, messages=HI, max_tokens=2)


def test_logprobs_equal_compute_logprobs(chat_server, sdk):
    prompt = [BOS, *b"logprobs of a prompt"]
    sampler = sdk.create_sampling_client(base_model=TINY).result()
    expected = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    out = oai(chat_server).completions.create(
        model=TINY, prompt=prompt, max_tokens=0, echo=True, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
    assert len(lp.tokens) == len(prompt) and out.usage.completion_tokens == 0
    # the echo leaves the BOS out of the text (zero width), so offsets index the prompt
    assert out.choices[0].text == "logprobs of a prompt"
    assert lp.text_offset == [0, *range(len(prompt) - 1)]
    # {text: logprob}, as OpenAI's legacy format has it: tokens with the same text (bytes
    # that are not UTF-8 on their own) share an entry
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    for token_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert max(top.values()) >= token_lp - 1e-6
    # a chat answer's logprobs are what compute_logprobs gives its tokens after the prompt
    rendered = chat_tokens(HI)
    chat = oai(chat_server).chat.completions.create(
        model=CHAT, messages=HI, max_tokens=8, temperature=0, logprobs=True
    )
    tokens = sdk_greedy(sdk, rendered, base=CHAT, max_tokens=8).tokens
    content = chat.choices[0].logprobs.content
    assert len(content) == len(tokens) and chat.usage.completion_tokens == len(tokens)
    chat_sampler = sdk.create_sampling_client(base_model=CHAT).result()
    full = chat_sampler.compute_logprobs(types.ModelInput.from_ints(rendered + tokens)).result()
    assert [t.logprob for t in content] == pytest.approx(full[len(rendered) :], abs=1e-4)


def test_streaming_gives_the_same_result(chat_server):
    client = oai(chat_server)
    kw = dict(model=CHAT, messages=HI, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # completions: the echoed prompt, then one event per token
    kw = dict(model=TINY, prompt="abc", max_tokens=6, temperature=0, echo=True)
    whole = client.completions.create(**kw)
    events = list(client.completions.create(**kw, stream=True))
    assert "".join(e.choices[0].text for e in events) == whole.choices[0].text
    assert events[0].choices[0].text == "abc"
    # the raw stream ends with [DONE]
    raw = httpx.post(
        f"{chat_server.url}/oai/api/v1/completions",
        json={**kw, "stream": True},
        headers={"Authorization": f"Bearer {KEYS[0]}"},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_n_and_seed(chat_server):
    client = oai(chat_server)
    kw = dict(model=TINY, prompt=[BOS, *b"seeded"], max_tokens=8, temperature=1.0, seed=11)
    a = client.completions.create(**kw, n=3)
    b = client.completions.create(**kw, n=3)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # three different samples
    two = client.completions.create(
        model=TINY, prompt=[[BOS, *b"one"], [BOS, *b"two"]], max_tokens=3, temperature=0, n=2
    )
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.usage.prompt_tokens == 4 + 4


def test_anthropic_messages(chat_server, sdk):
    client = claude(chat_server)
    rendered = chat_tokens([{"role": "system", "content": "Be brief"}, *HI])
    expected = sdk_greedy(sdk, rendered, base=CHAT, max_tokens=10)
    kw = dict(
        model=CHAT, max_tokens=10, messages=HI, system="Be brief", extra_body={"temperature": 0}
    )
    message = client.messages.create(**kw)
    tokenizer = build_chat_tokenizer()
    assert message.content[0].text == tokenizer.decode(expected.tokens, skip_special_tokens=True)
    assert message.usage.input_tokens == len(rendered)
    assert message.usage.output_tokens == len(expected.tokens)
    assert message.stop_reason == ("max_tokens" if len(expected.tokens) == 10 else "end_turn")
    with client.messages.stream(**kw) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == message.content[0].text == final.content[0].text
    assert final.stop_reason == message.stop_reason
    assert final.usage.output_tokens == message.usage.output_tokens
    counted = client.messages.count_tokens(model=CHAT, messages=HI, system="Be brief")
    assert counted.input_tokens == len(rendered)


@pytest.fixture(scope="module")
def checkpoint(sdk):
    """A tinkerd/tiny LoRA trained for a few steps to say `TEXT`, saved for sampling."""
    text = b"tinkerd says hi. tinkerd says hi. tinkerd says hi."
    tokens = [BOS, *text]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    run = sdk.create_lora_training_client(base_model=TINY, rank=8, seed=0).result()
    for _ in range(30):
        run.forward_backward([datum], "cross_entropy")
        run.optim_step(types.AdamParams(learning_rate=2e-2))
    return run.save_weights_for_sampler("oai").result().path


def test_a_checkpoint_gives_its_own_output(chat_server, sdk, checkpoint):
    prompt = [BOS, *b"tinkerd"]
    expected = sdk_greedy(sdk, prompt, path=checkpoint, max_tokens=20)
    base = sdk_greedy(sdk, prompt, base=TINY, max_tokens=20)
    assert expected.tokens != base.tokens
    out = oai(chat_server).completions.create(
        model=checkpoint, prompt=prompt, max_tokens=20, temperature=0, logprobs=0
    )
    assert out.choices[0].text == build_tokenizer().decode(expected.tokens)
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    # `<base>;<path>` names the same weights
    both = oai(chat_server).completions.create(
        model=f"{TINY};{checkpoint}", prompt=prompt, max_tokens=20, temperature=0
    )
    assert both.choices[0].text == out.choices[0].text
    # a stop string cuts the text before it; the finish reason says so
    text = out.choices[0].text
    assert text.isascii() and len(text) > 8
    stop = text[6:8]
    cut = oai(chat_server).completions.create(
        model=checkpoint, prompt=prompt, max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == text.find(stop) + len(stop)  # stop's tokens ran
    # listed among the key's models, and only among its own
    assert checkpoint in [m.id for m in oai(chat_server).models.list()]
    assert checkpoint not in [m.id for m in oai(chat_server, KEYS[1]).models.list()]


def test_keys_and_isolation(chat_server, checkpoint):
    with pytest.raises(openai.NotFoundError):  # another key's checkpoint looks absent
        oai(chat_server, KEYS[1]).completions.create(model=checkpoint, prompt="x", max_tokens=1)
    with pytest.raises(anthropic.NotFoundError):
        claude(chat_server, KEYS[1]).messages.create(model=checkpoint, max_tokens=1, messages=HI)
    with pytest.raises(openai.AuthenticationError):
        oai(chat_server, "not-a-key").models.list()
    with pytest.raises(anthropic.AuthenticationError):
        claude(chat_server, "not-a-key").messages.create(model=CHAT, max_tokens=1, messages=HI)
    no_key = httpx.post(
        f"{chat_server.url}/oai/api/v1/completions", json={"model": TINY, "prompt": "x"}
    )
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.BadRequestError, match="not served"):
        oai(chat_server).completions.create(model="no/such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai(chat_server).completions.create(model=TINY, prompt="x", max_tokens=-1)


# ---------------------------------------------------------------- the mapping, without a server


def sampled(text: bytes, reason="length", extra=()) -> SampledSequence:
    tokens = [*text, *extra]
    return SampledSequence(stop_reason=reason, tokens=tokens, logprobs=[-1.0] * len(tokens))


def test_eos_and_stop_strings_cut_the_text():
    tok = build_tokenizer()  # tinkerd/tiny: EOS is 257
    stops = generate.make_stops({257}, None)
    gen = generate.generation(tok, sampled(b"hello", "stop", [257]), stops, per_token=True)
    assert (gen.text, gen.tokens[-1], gen.finish_reason) == ("hello", 257, "stop")
    assert generate.pieces(gen) == ["h", "e", "l", "l", "o", ""]
    # with stop strings, the sampler is told the EOS text too, and text after EOS is cut
    stops = generate.make_stops({257}, ["lo w"])
    params = stops.params(tok, max_tokens=5)
    assert params.stop == ["lo w", "<|eos|>"]
    gen = generate.generation(tok, sampled(b"hello world", "stop"), stops, per_token=True)
    assert (gen.text, gen.stop_sequence, gen.finish_reason) == ("hel", "lo w", "stop")
    assert bytes(gen.tokens) == b"hello w"  # up to the token that completed the stop
    assert "".join(generate.pieces(gen)) == "hel"
    gen = generate.generation(tok, sampled(b"ab", "stop", [257, 99]), stops, per_token=False)
    assert (gen.text, gen.tokens, gen.finish_reason) == ("ab", [97, 98, 257], "stop")
    gen = generate.generation(tok, sampled(b"abc", "length"), stops, per_token=False)
    assert (gen.text, gen.finish_reason, gen.stop_sequence) == ("abc", "length", None)


def test_pieces_split_multibyte_characters_exactly():
    tok = build_tokenizer()
    gen = generate.generation(tok, sampled("é!€".encode()), generate.make_stops(set(), None), True)
    assert gen.text == "é!€" and "".join(generate.pieces(gen)) == "é!€"
    assert len(generate.pieces(gen)) == len(gen.tokens) == 6
    assert logprobs.token_bytes(tok, 0xC3) == [0xC3]  # half a character: its own byte


def test_model_names_and_bad_requests():
    assert common.split_model("tinkerd/tiny") == ("tinkerd/tiny", None)
    path = "tinker://s:train:0/sampler_weights/a"
    assert common.split_model(path) == (None, path)
    assert common.split_model(f"tinkerd/tiny;{path}") == ("tinkerd/tiny", path)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        api.parse(
            api.MessagesRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
    with pytest.raises(InvalidRequestError, match="only text"):
        common.text_of([common.ContentPart(type="image")])
    with pytest.raises(InvalidRequestError, match="empty"):
        generate.make_stops(set(), [""])


def test_the_evaluation_example_runs(chat_server):
    import subprocess
    import sys

    example = ROOT / "examples" / "openai_eval.py"
    args = [sys.executable, str(example), "--base-url", chat_server.url, "--api-key", KEYS[0]]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "multiple-choice accuracy: " in result.stdout
    assert "generation (" in result.stdout


def test_lm_eval_loglikelihood_request_shape(chat_server, sdk):
    """The body lm-evaluation-harness's local-completions sends for log-likelihoods
    (token prompts in a batch, echo, max_tokens=1, logprobs=1): the context's and the
    continuation's logprobs, the sampled token last, and a greedy check that holds."""
    context, continuation = [BOS, *b"Q: sky? A:"], [*b" blue"]
    body = {
        "model": TINY,
        "prompt": [context + continuation, context],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    out = httpx.post(
        f"{chat_server.url}/oai/api/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEYS[0]}"},
    ).json()
    first = out["choices"][0]["logprobs"]
    assert len(first["token_logprobs"]) == len(context) + len(continuation) + 1
    sampler = sdk.create_sampling_client(base_model=TINY).result()
    full = sampler.compute_logprobs(types.ModelInput.from_ints(context + continuation)).result()
    ctxlen = len(context)
    assert first["token_logprobs"][ctxlen:-1] == pytest.approx(full[ctxlen:], abs=1e-4)
    for value, top in zip(first["token_logprobs"][ctxlen:-1], first["top_logprobs"][ctxlen:-1]):
        assert max(top.values()) >= value - 1e-6


def test_a_final_assistant_message_is_continued():
    tok = build_chat_tokenizer()
    messages = [*HI, {"role": "assistant", "content": "Sure,"}]
    tokens = common.render_chat(tok, messages)
    assert tokens == chat_tokens(HI) + [*b"Sure,"]  # no <|eot_id|>: the turn goes on
    with pytest.raises(InvalidRequestError, match="no chat template"):
        common.render_chat(build_tokenizer(), HI)
    req = api.parse(api.ChatCompletionRequest, {"model": "m", "messages": HI, "tools": [{}]})
    with pytest.raises(InvalidRequestError, match="tools"):
        chat_messages(req)


class CannedBackend:
    """A SamplingBackend whose sampler answers with fixed tokens: the mapping alone."""

    def __init__(self, tokens: list[int], reason: str = "length"):
        self.tokens, self.reason, self.calls = tokens, reason, []

    def authenticate(self, api_key):
        return "owner"

    def resolve(self, owner, base_model, model_path):
        return "weights"

    def tokenizer(self, weights):
        return build_chat_tokenizer()

    def eos_token_ids(self, weights):
        return {257, EOT}

    def sample_many(self, owner, weights, prompts, n, params, listeners=None, **options):
        from concurrent.futures import Future

        from tinkerd.types import SampleResponse

        futures = []
        for p, prompt in enumerate(prompts):
            self.calls.append((prompt, n, params))
            seq = SampledSequence(
                stop_reason=self.reason, tokens=self.tokens, logprobs=[-0.5] * len(self.tokens)
            )
            for i in range(n):  # as the sampler hands tokens to a stream
                for token in self.tokens if listeners else []:
                    listeners[p](i, token)
            futures.append(Future())
            futures[-1].set_result(SampleResponse(sequences=[seq] * n))
        return futures

    def models(self, owner):
        return [CHAT]


def anthropic_reply(backend, **body):
    """The reply, and its events read to the end (a stream)."""
    import asyncio

    body = {"model": CHAT, "max_tokens": 8, "messages": HI} | body

    async def answer():
        reply = await api.messages(backend, "owner", api.parse(api.MessagesRequest, body))
        reply.events = reply.events and [e async for e in reply.events]
        return reply

    return asyncio.run(answer())


def test_anthropic_stop_reasons_and_events():
    ended = anthropic_reply(CannedBackend([*b"Hello", EOT, *b"junk"], "stop"))
    assert ended.body["content"] == [{"type": "text", "text": "Hello"}]
    assert (ended.body["stop_reason"], ended.body["stop_sequence"]) == ("end_turn", None)
    assert ended.body["usage"]["output_tokens"] == 6  # Hello and <|eot_id|>
    backend = CannedBackend([*b"one, two"], "stop")
    cut = anthropic_reply(backend, stop_sequences=[", "], system="Count.")
    assert (cut.body["stop_reason"], cut.body["stop_sequence"]) == ("stop_sequence", ", ")
    assert cut.body["content"][0]["text"] == "one"
    prompt, _, params = backend.calls[0]
    assert prompt == chat_tokens([{"role": "system", "content": "Count."}, *HI])
    assert params.stop == [", ", "<|end_of_text|>", "<|eot_id|>"]  # EOS still stops
    assert params.max_tokens == 8 and params.temperature == 1.0
    full = anthropic_reply(CannedBackend([*b"abcdefgh"]), stream=True)
    assert '"stop_reason": "max_tokens"' in full.events[-2]
    assert (
        "".join(
            json.loads(e.split("data: ")[1])["delta"].get("text", "") for e in full.events[3:-3]
        )
        == "abcdefgh"
    )
    events = [e.split("\n")[0].removeprefix("event: ") for e in full.events]
    assert events == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 8,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_compatible_requests_join_the_sampling_client_batch(engine, tmp_path):
    """An OpenAI request decodes in the same batch as a SamplingClient request (the
    engine's `sample`, which `/api/v1/asample` calls) running on that base."""
    from starlette.testclient import TestClient

    from tinkerd.server.app import Server, create_app
    from tinkerd.types import SamplingParams

    client = TestClient(create_app(Server(engine, tmp_path, list(KEYS), [TINY], 0.05)))
    weights = engine.sampler_for(base_model=TINY)
    params = SamplingParams(max_tokens=200, stop=[], temperature=1.0, seed=0)
    long = engine.sample(weights, [BOS, *b"a long one"], 1, params)
    body = {"model": TINY, "prompt": [BOS, *b"short"], "max_tokens": 4, "temperature": 0}
    out = client.post(
        "/oai/api/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS[0]}"}
    )
    assert out.status_code == 200 and not long.done()  # it finished while the other ran
    long.result()
    assert any(requests == 2 for _, requests in engine.sampler_stats(TINY))
