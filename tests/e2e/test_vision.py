"""Images in: ImageChunk / ImageAssetPointerChunk on the built-in vision-language model
`tinkerd/tiny-vl` (a tiny random Qwen3-VL) and a tiny random Qwen2.5-VL: embedded, over
HTTP with tinkerd's client, the official SDK, the OpenAI and Anthropic clients and
tinker-cookbook's Qwen3-VL renderer."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import KEYS, ROOT, TINY, ServerProcess, make_datum

from tinkerd.engine.tiny_vl import TINY_VL_MODEL_NAME as VL
from tinkerd.errors import InvalidRequestError
from tinkerd.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ImageAssetPointerChunk,
    ImageChunk,
    LoraConfig,
    ModelInput,
    SamplingParams,
    chunk_from,
    prompt_tokens,
)

RED, BLUE = (220, 30, 30), (30, 40, 220)
VISION_START, VISION_END, IMAGE_PAD = 259, 260, 261  # the tiny VLM's special token ids


def png(rgb=RED, size=(32, 32), fmt="PNG") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format=fmt)
    return out.getvalue()


def with_image(image, text: bytes = b" is red", before: bytes = b"") -> ModelInput:
    """`before` <|vision_start|> image <|vision_end|> `text`."""
    return ModelInput(
        chunks=[
            EncodedTextChunk(tokens=[*before, VISION_START]),
            image,
            EncodedTextChunk(tokens=[VISION_END, *text]),
        ]
    )


def image_datum(image=None, text: bytes = b" is red", image_tokens: int = 4) -> Datum:
    """Next-token targets over the text after the image (weights 0 on and before it);
    `image_tokens`: the image's positions, where its expected_tokens is unset."""
    image = image or ImageChunk(data=png(), format="png", expected_tokens=4)
    model_input = with_image(image, text)
    n = 2 + len(text) + (image.expected_tokens or image_tokens)
    tail = [VISION_END, *text]
    targets = [0] * (n - len(tail)) + tail[1:] + [258]
    weights = [0.0] * (n - len(tail)) + [1.0] * len(tail)
    return Datum(
        model_input=model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights}
    )


@pytest.fixture
def vl_run(engine):
    model_id = engine.create_model(VL, LoraConfig(rank=8, seed=0))
    yield model_id
    engine.unload_model(model_id)


@pytest.fixture(scope="module")
def qwen25_vl(tmp_path_factory) -> str:
    """A tiny random Qwen2.5-VL (the tiny VLM's tokenizer, image processor and language
    model sizes; Qwen2.5-VL's windowed vision tower), as a local model directory."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tinkerd.engine import tiny_vl

    text = {k: v for k, v in tiny_vl.TEXT_CONFIG.items() if k != "head_dim"}
    vision = dict(tiny_vl.VISION_CONFIG, window_size=32, fullatt_block_indexes=[1])
    for key in ("num_position_embeddings", "deepstack_visual_indexes"):
        vision.pop(key)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        **{k: v for k, v in tiny_vl.TINY_VL_CONFIG.items() if k.endswith("_id")},
    )
    out = tmp_path_factory.mktemp("qwen25-vl")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out)
    tiny_vl.build_vl_tokenizer().save_pretrained(out)
    tiny_vl.build_image_processor().save_pretrained(out)
    return str(out)


@pytest.fixture(params=["qwen3-vl", "qwen2.5-vl"])
def any_vl_run(request, engine):
    """A run on each supported architecture: tinkerd/tiny-vl, a tiny Qwen2.5-VL."""
    base = VL if request.param == "qwen3-vl" else request.getfixturevalue("qwen25_vl")
    model_id = engine.create_model(base, LoraConfig(rank=8, seed=0))
    yield model_id
    engine.unload_model(model_id)


def logprobs_of(engine, model_id, datum) -> torch.Tensor:
    return engine.forward(model_id, [datum]).loss_fn_outputs[0]["logprobs"].to_torch()


# ---------------------------------------------------------------- the model and its LoRA


def test_tiny_vl_is_a_tiny_qwen3_vl_with_lora_on_the_language_model_only(engine, vl_run):
    base = engine.run(vl_run).base
    assert type(base.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert sum(p.numel() for p in base.model.parameters()) < 500_000
    assert base.vision is not None and base.vision.image_token_id == IMAGE_PAD
    adapted = list(engine.run(vl_run).adapter_state())
    assert adapted and all(".visual." not in name for name in adapted)
    assert any("language_model" in name for name in adapted)
    assert any("lm_head" in name for name in adapted)


def test_rope_positions_match_the_models_own(engine, any_vl_run):
    """tinkerd's position ids (text + 3-D RoPE) equal the model's own get_rope_index."""
    from tinkerd.engine.vision import expand, rope_positions

    base = engine.run(any_vl_run).base
    model_input = with_image(ImageChunk(data=png(size=(64, 40)), format="png"), b" hi", b"ab")
    model_input = model_input.append(ImageChunk(data=png(size=(20, 50)), format="png"))
    model_input = model_input.append(EncodedTextChunk(tokens=[*b"end"]))
    tokens, images = expand(model_input, base.vision, VL, "")
    ids = torch.tensor([tokens])
    ours, delta = rope_positions(ids, [images], None, base.vision)
    theirs, their_delta = base.model.model.get_rope_index(
        ids,
        mm_token_type_ids=(ids == IMAGE_PAD).int(),
        image_grid_thw=torch.stack([image.grid_thw for image in images]),
    )
    assert torch.equal(ours[1:], theirs) and int(delta[0]) == int(their_delta[0, 0])
    assert torch.equal(ours[0, 0], torch.arange(len(tokens)))


# ---------------------------------------------------------------- training


def test_a_datum_with_an_image_trains_and_its_loss_falls(engine, any_vl_run):
    data = [image_datum()]
    losses = []
    for _ in range(6):
        out = engine.forward_backward(any_vl_run, data, "cross_entropy")
        losses.append(out.metrics["loss:sum"])
        engine.optim_step(any_vl_run, AdamParams(learning_rate=5e-3))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0]


def test_two_images_give_different_logprobs_for_the_same_text(engine, vl_run):
    red = logprobs_of(engine, vl_run, image_datum(ImageChunk(data=png(RED), format="png")))
    blue = logprobs_of(engine, vl_run, image_datum(ImageChunk(data=png(BLUE), format="png")))
    again = logprobs_of(engine, vl_run, image_datum(ImageChunk(data=png(RED), format="png")))
    assert torch.equal(red, again)
    after_image = slice(6, None)  # the text after <|vision_end|> reads the image
    assert (red[after_image] - blue[after_image]).abs().max() > 1e-3


def test_custom_loss_with_an_image(engine, vl_run):
    """forward_backward_custom with the gradient of -sum(logprobs * weights) (cross
    entropy's) leaves the same gradient as forward_backward with cross_entropy."""
    twin = engine.create_model(VL, LoraConfig(rank=8, seed=0))
    try:
        datum = image_datum()
        weights = datum.loss_fn_inputs["weights"].to_torch()
        out, _ = engine.forward_backward_custom(vl_run, [datum], lambda lps: ([-weights], None))
        reference = engine.forward_backward(twin, [datum], "cross_entropy")
        got = -(out.loss_fn_outputs[0]["logprobs"].to_torch() * weights).sum().item()
        assert got == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
        grads = [p.grad for p in engine.run(vl_run).params]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        for a, b in zip(grads, [p.grad for p in engine.run(twin).params]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    finally:
        engine.unload_model(twin)


def test_a_vl_run_and_a_text_run_on_different_bases_in_one_batch_of_requests(engine, vl_run):
    text_run = engine.create_model(TINY, LoraConfig(rank=4, seed=1))
    try:
        text = [make_datum([256, *b"plain text"])]
        alone = [
            engine.forward_backward(vl_run, [image_datum()], "cross_entropy"),
            engine.forward_backward(text_run, text, "cross_entropy"),
        ]
        requests = [
            engine.prepare(vl_run, [image_datum()], "cross_entropy", None),
            engine.prepare(text_run, text, "cross_entropy", None),
        ]
        together = engine.run_losses(requests, backward=True)
        for a, b in zip(alone, together):
            assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
    finally:
        engine.unload_model(text_run)


def test_two_vl_runs_packed_in_one_pass_end_as_alone(engine):
    """Rows of two runs (different images, lengths, a text-only row) in one forward and
    backward, each through its own adapter, give each run the loss and gradient it gets
    alone."""
    alone = [engine.create_model(VL, LoraConfig(rank=r, seed=r)) for r in (4, 8)]
    together = [engine.create_model(VL, LoraConfig(rank=r, seed=r)) for r in (4, 8)]
    try:
        data = [
            [image_datum(), make_datum([*b"no image here"])],
            [image_datum(ImageChunk(data=png(BLUE, (48, 32)), format="png"), b" is blue!", 6)],
        ]
        outs = [engine.forward_backward(m, d, "cross_entropy") for m, d in zip(alone, data)]
        requests = [engine.prepare(m, d, "cross_entropy", None) for m, d in zip(together, data)]
        packed = engine.run_losses(requests, backward=True)
        for a, b in zip(outs, packed):
            assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
            for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs):
                torch.testing.assert_close(
                    y["logprobs"].to_torch(), x["logprobs"].to_torch(), atol=1e-5, rtol=0
                )
        for m, n in zip(alone, together):
            for p, q in zip(engine.run(m).params, engine.run(n).params, strict=True):
                torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4)
    finally:
        for m in alone + together:
            engine.unload_model(m)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "chunk, message",
    [
        (ImageChunk(data=png(), format="png", expected_tokens=9), "expected_tokens is 9, but"),
        (ImageChunk(data=png(fmt="JPEG"), format="png"), "format is 'png' but the data is jpeg"),
        (ImageChunk(data=b"not an image", format="png"), "not a readable png image"),
        (ImageChunk(data=png()[:70], format="png"), "cannot be read or processed"),
        (ImageChunk(data=png(size=(2000, 4)), format="png"), "cannot be read or processed"),
        (ImageAssetPointerChunk(format="png", location="https://example.com/a.png"), "no network"),
    ],
)
def test_bad_images_are_refused_by_name(engine, vl_run, chunk, message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        engine.forward(vl_run, [make_datum([1, 2]), image_datum(chunk)])
    assert "data[1].model_input.chunks[1]" in str(e.value)


def test_image_token_in_text_and_images_on_a_text_model_are_refused(engine, vl_run):
    forged = make_datum([VISION_START, IMAGE_PAD, IMAGE_PAD, VISION_END])
    with pytest.raises(
        InvalidRequestError, match=r"chunks\[0\]: token id 261 is this model's image"
    ):
        engine.forward(vl_run, [forged])
    text_run = engine.create_model(TINY, LoraConfig(rank=4, seed=0))
    try:
        with pytest.raises(InvalidRequestError, match="tinkerd/tiny does not take images"):
            engine.forward(text_run, [image_datum()])
    finally:
        engine.unload_model(text_run)


def test_asset_pointers_read_only_the_image_directory(engine, vl_run, tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(png())
    (tmp_path / "outside.png").write_bytes(png())
    pointer = ImageAssetPointerChunk(format="png", location="file://red.png", expected_tokens=4)
    with pytest.raises(InvalidRequestError, match="need the server's image directory"):
        engine.forward(vl_run, [image_datum(pointer)])
    monkeypatch.setenv("TINKERD_IMAGE_DIR", str(tmp_path / "images"))
    by_bytes = logprobs_of(engine, vl_run, image_datum())
    for location in ("file://red.png", f"file://{tmp_path}/images/red.png", "red.png"):
        chunk = ImageAssetPointerChunk(format="png", location=location, expected_tokens=4)
        assert torch.equal(logprobs_of(engine, vl_run, image_datum(chunk)), by_bytes)
    for location in (f"file://{tmp_path}/outside.png", "file://../outside.png", "/etc/hostname"):
        chunk = ImageAssetPointerChunk(format="png", location=location)
        with pytest.raises(InvalidRequestError, match="not a file in the server's image directory"):
            engine.forward(vl_run, [image_datum(chunk)])


# ---------------------------------------------------------------- sampling


def test_sampler_logprobs_equal_trainer_logprobs_with_an_image(engine, any_vl_run):
    vl_run = any_vl_run
    engine.forward_backward(vl_run, [image_datum()], "cross_entropy")
    engine.optim_step(vl_run, AdamParams(learning_rate=1e-2))
    weights = engine.save_weights_for_sampler(vl_run, "s")
    prompt = with_image(ImageChunk(data=png(), format="png", expected_tokens=4), b" is")
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=[])
    sampled = engine.sample(weights, prompt_tokens(prompt), 1, params, True).result()
    tokens = sampled.sequences[0].tokens
    full = prompt
    for t in tokens[:-1]:
        full = full.append_int(t)
    n_prompt = prompt.length
    datum = Datum(
        model_input=full,
        loss_fn_inputs={
            "target_tokens": [0] * (n_prompt - 1) + tokens,
            "weights": [1.0] * full.length,
        },
    )
    trained = logprobs_of(engine, vl_run, datum)
    torch.testing.assert_close(
        trained[n_prompt - 1 :], torch.tensor(sampled.sequences[0].logprobs), atol=1e-4, rtol=0
    )
    # compute_logprobs' numbers (prompt logprobs) match the trainer's on the prompt's text
    prompt_lps = sampled.prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == n_prompt
    text_datum = image_datum(ImageChunk(data=png(), format="png"), b" is")
    trained_prompt = logprobs_of(engine, vl_run, text_datum)
    torch.testing.assert_close(
        torch.tensor(prompt_lps[-2:]), trained_prompt[-3:-1], atol=1e-4, rtol=0
    )


def test_different_images_in_one_sampler_batch_keep_their_own_positions(engine, vl_run):
    """Prompts of different image sizes and lengths, and a text-only prompt, on the base
    and on a trained adapter, decoded in one batch, each give the tokens and logprobs they
    give alone."""
    engine.forward_backward(vl_run, [image_datum()], "cross_entropy")
    engine.optim_step(vl_run, AdamParams(learning_rate=1e-2))
    base, trained = engine.sampler_for(base_model=VL), engine.save_weights_for_sampler(vl_run)
    prompts = [
        (base, with_image(ImageChunk(data=png(RED, (64, 64)), format="png"), b" a")),
        (trained, with_image(ImageChunk(data=png(BLUE, (16, 48)), format="png"), b" text", b"xy")),
        (trained, with_image(ImageChunk(data=png(RED), format="png"), b" a")),
        (base, ModelInput.from_ints([*b"text only"])),
    ]
    params = SamplingParams(max_tokens=5, temperature=0, stop=[])
    alone = [engine.sample(w, prompt_tokens(p), 1, params).result() for w, p in prompts]
    with engine.run(vl_run).base.lock:  # the sampler waits: the requests join one batch
        futures = [engine.sample(w, prompt_tokens(p), 1, params) for w, p in prompts]
    for a, f in zip(alone, futures):
        b = f.result()
        assert a.sequences[0].tokens == b.sequences[0].tokens
        torch.testing.assert_close(
            torch.tensor(b.sequences[0].logprobs),
            torch.tensor(a.sequences[0].logprobs),
            atol=1e-4,
            rtol=0,
        )
    assert max(requests for _, requests in engine.sampler_stats(VL)[-6:]) >= 3


# ---------------------------------------------------------------- checkpoints and export


def test_state_round_trip_and_merged_export_with_an_image(engine, vl_run, tmp_path):
    from transformers import AutoModelForImageTextToText

    from tinkerd.engine.checkpoints import export_merged
    from tinkerd.engine.vision import forward_inputs

    engine.forward_backward(vl_run, [image_datum()], "cross_entropy")
    engine.optim_step(vl_run, AdamParams(learning_rate=1e-2))
    want = logprobs_of(engine, vl_run, image_datum())
    saved = engine.save_state(vl_run, "state")
    other = engine.create_model(VL, LoraConfig(rank=8, seed=5))
    try:
        engine.load_state(other, saved.tinker_path, with_optimizer=True)
        torch.testing.assert_close(
            logprobs_of(engine, other, image_datum()), want, atol=1e-6, rtol=0
        )
    finally:
        engine.unload_model(other)

    run = engine.run(vl_run)
    info = engine.checkpoints.save(run, "sampler_weights", "export", with_optimizer=False)
    export_merged(run.base.path, info, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    batch = engine.prepare(vl_run, [image_datum()], "cross_entropy", None).batch
    extra, _ = forward_inputs(run.base.vision, batch.input_ids, batch.images)
    with torch.no_grad():
        logits = merged(input_ids=batch.input_ids, **extra).logits[0].float()
    got = logits.log_softmax(-1).gather(-1, batch.targets[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- wire formats


def test_sdk_image_chunks_decode_from_protobuf_and_json():
    import tinker
    from tinker.proto import request_conv

    from tinkerd.wire_proto import decode_forward_backward_request

    image = tinker.types.ImageChunk(data=png(), format="png", expected_tokens=4)
    sdk_input = tinker.ModelInput(
        chunks=[tinker.EncodedTextChunk(tokens=[1, 2]), image, tinker.EncodedTextChunk(tokens=[3])]
    )
    datum = tinker.Datum(model_input=sdk_input, loss_fn_inputs={"target_tokens": [0] * 7})
    request = tinker.types.ForwardBackwardRequest(
        forward_backward_input=tinker.types.ForwardBackwardInput(
            data=[datum], loss_fn="cross_entropy"
        ),
        model_id="m",
        seq_id=1,
    )
    body = request_conv.forward_backward_request_to_proto(request).SerializeToString()
    ours = decode_forward_backward_request(body)["data"][0].model_input
    assert ours.chunks[1] == ImageChunk(data=png(), format="png", expected_tokens=4)
    assert ours.length == 7 and ours.chunks[2].tokens == [3]
    from_json = ModelInput.model_validate_json(sdk_input.model_dump_json())
    assert from_json == ours
    assert ModelInput.model_validate_json(ours.model_dump_json()) == ours
    pointer = tinker.types.ImageAssetPointerChunk(format="jpeg", location="file://a.jpg")
    parsed = ModelInput.model_validate({"chunks": [pointer.model_dump()]})
    assert parsed.chunks[0] == ImageAssetPointerChunk(format="jpeg", location="file://a.jpg")
    # the embedded clients take the SDK's objects as they are
    assert [chunk_from(c) for c in sdk_input.chunks] == ours.chunks
    assert chunk_from(pointer) == parsed.chunks[0]


# ---------------------------------------------------------------- the official SDK over HTTP


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    (images / "red.png").write_bytes(png())
    proc = ServerProcess(
        tmp_path_factory.mktemp("vl-data"), "--model", VL, "--image-dir", str(images)
    )
    yield proc
    proc.stop()


def test_official_sdk_trains_and_samples_with_images(vl_server):
    import tinker

    service = tinker.ServiceClient(base_url=vl_server.url, api_key=KEYS[0])
    client = service.create_lora_training_client(base_model=VL, rank=8, seed=0).result()
    sdk_image = tinker.types.ImageChunk(data=png(), format="png", expected_tokens=4)
    ours = image_datum()
    datum = tinker.Datum(
        model_input=tinker.ModelInput(
            chunks=[
                tinker.EncodedTextChunk(tokens=ours.model_input.chunks[0].tokens),
                sdk_image,
                tinker.EncodedTextChunk(tokens=ours.model_input.chunks[2].tokens),
            ]
        ),
        loss_fn_inputs={k: v.tolist() for k, v in ours.loss_fn_inputs.items()},
    )
    losses = []
    for _ in range(4):  # forward_backward travels as protobuf
        fwd = client.forward_backward([datum], "cross_entropy")
        client.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
        losses.append(fwd.result().metrics["loss:sum"])
    assert losses[-1] < losses[0]

    forward = client.forward([datum], "cross_entropy").result()
    trained = forward.loss_fn_outputs[0]["logprobs"].tolist()
    sampler = client.save_weights_and_get_sampling_client(name="vl").result()
    prompt = datum.model_input
    logprobs = sampler.compute_logprobs(prompt).result()  # JSON, image as base64
    assert logprobs[0] is None
    # the text after <|vision_end|> (position 6 on): the trainer's targets there are it
    assert len(logprobs) == 13 and logprobs[6:] == pytest.approx(trained[5:-1], abs=1e-4)

    pointer = tinker.types.ImageAssetPointerChunk(
        format="png", location="file://red.png", expected_tokens=4
    )
    by_pointer = tinker.ModelInput(chunks=[prompt.chunks[0], pointer, prompt.chunks[2]])
    assert sampler.compute_logprobs(by_pointer).result() == pytest.approx(logprobs, abs=1e-6)

    out = sampler.sample(prompt, 1, tinker.SamplingParams(max_tokens=4, temperature=0)).result()
    assert 1 <= len(out.sequences[0].tokens) <= 4

    bad = tinker.types.ImageChunk(data=png(), format="png", expected_tokens=7)
    with pytest.raises(tinker.BadRequestError, match="expected_tokens is 7"):
        sampler.sample(
            tinker.ModelInput(chunks=[prompt.chunks[0], bad, prompt.chunks[2]]),
            1,
            tinker.SamplingParams(max_tokens=1),
        ).result()


def test_openai_and_anthropic_routes_take_images(vl_server):
    """An image_url data: URL (OpenAI) and a base64 image block (Anthropic) reach the model
    as the same image chunk: greedy answers equal the SDK sampler's on the prompt the
    chat template makes; other image sources are refused by field."""
    import base64

    import anthropic
    import openai
    import tinker

    from tinkerd.engine.tiny_vl import build_vl_tokenizer

    data = base64.b64encode(png(BLUE)).decode()
    oai = openai.OpenAI(base_url=f"{vl_server.url}/oai/api/v1", api_key=KEYS[0], max_retries=0)
    ant = anthropic.Anthropic(
        base_url=f"{vl_server.url}/anthropic/api", api_key=KEYS[0], max_retries=0
    )
    chat = oai.chat.completions.create(
        model=VL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what colour? "},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                ],
            }
        ],
        max_tokens=4,
        temperature=0,
        logprobs=True,
    )
    message = ant.messages.create(
        model=VL,
        max_tokens=4,
        extra_body={"temperature": 0},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what colour? "},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": data},
                    },
                ],
            }
        ],
    )
    # the same prompt by hand: the template's text around the image's chunk
    tokenizer = build_vl_tokenizer()
    before = tokenizer.encode(
        "<|im_start|>user\nwhat colour? <|vision_start|>", add_special_tokens=False
    )
    after = tokenizer.encode(
        "<|vision_end|><|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    prompt = tinker.ModelInput(
        chunks=[
            tinker.EncodedTextChunk(tokens=before),
            tinker.types.ImageChunk(data=png(BLUE), format="png"),
            tinker.EncodedTextChunk(tokens=after),
        ]
    )
    sampler = tinker.ServiceClient(base_url=vl_server.url, api_key=KEYS[0]).create_sampling_client(
        base_model=VL
    )
    want = (
        sampler.sample(prompt, 1, tinker.SamplingParams(max_tokens=4, temperature=0))
        .result()
        .sequences[0]
    )
    got = [lp.logprob for lp in chat.choices[0].logprobs.content]
    assert got == pytest.approx(want.logprobs[: len(got)], abs=1e-4)
    text = tokenizer.decode(want.tokens, skip_special_tokens=True)
    assert chat.choices[0].message.content == text
    assert message.content[0].text == text if message.content else text == ""

    with pytest.raises(
        openai.BadRequestError, match=r"messages\[0\].content\[0\].image_url.url: only data"
    ):
        oai.chat.completions.create(
            model=VL,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
                }
            ],
        )
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[0\].content\[0\].source.type"):
        ant.messages.create(
            model=VL,
            max_tokens=2,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}],
                }
            ],
        )


def test_cookbook_vlm_classifier_core_loop(vl_server):
    """tinker-cookbook's vlm_classifier loop, minus its dataset download: the Qwen3-VL
    renderer (with the model's own tokenizer and image processor, found from get_info's
    tokenizer id) builds supervised examples with images, the official SDK trains them
    and samples the renderer's generation prompt."""
    import tinker
    from PIL import Image
    from tinker_cookbook import renderers
    from tinker_cookbook.image_processing_utils import get_image_processor
    from tinker_cookbook.supervised.common import datum_from_model_input_weights
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    service = tinker.ServiceClient(base_url=vl_server.url, api_key=KEYS[0])
    client = service.create_lora_training_client(base_model=VL, rank=8, seed=0).result()
    tokenizer_id = client.get_info().model_data.tokenizer_id
    renderer = renderers.get_renderer(
        name="qwen3_vl_instruct",
        tokenizer=get_tokenizer(tokenizer_id),
        image_processor=get_image_processor(tokenizer_id),
    )

    def conversation(rgb, answer=None):
        image = renderers.ImagePart(type="image", image=Image.new("RGB", (32, 32), rgb))
        question = renderers.TextPart(type="text", text="What colour is this?")
        messages = [renderers.Message(role="user", content=[image, question])]
        if answer:
            messages.append(renderers.Message(role="assistant", content=answer))
        return messages

    data = [
        datum_from_model_input_weights(
            *renderer.build_supervised_example(
                messages=conversation(rgb, name),
                train_on_what=renderers.TrainOnWhat.LAST_ASSISTANT_MESSAGE,
            ),
            max_length=512,
        )
        for rgb, name in ((RED, "red"), (BLUE, "blue"))
    ]
    assert any(c.type == "image" for c in data[0].model_input.chunks)
    losses = []
    for _ in range(5):
        fwd = client.forward_backward(data, "cross_entropy")
        client.optim_step(tinker.AdamParams(learning_rate=5e-3)).result()
        losses.append(fwd.result().metrics["loss:sum"])
    assert losses[-1] < losses[0]
    sampler = client.save_weights_and_get_sampling_client(name="classifier").result()
    prompt = renderer.build_generation_prompt(conversation(RED))
    params = tinker.SamplingParams(max_tokens=8, temperature=0, stop=renderer.get_stop_sequences())
    result = sampler.sample(prompt, 1, params).result()
    message, _ = renderer.parse_response(result.sequences[0].tokens)
    assert message["role"] == "assistant"


def test_learning_check_example_teaches_four_colours(monkeypatch):
    """examples/vlm_colors.py: greedy answers 0/4 right before training, 4/4 after."""
    import runpy

    script = str(ROOT / "examples" / "vlm_colors.py")
    monkeypatch.setattr("sys.argv", [script])
    with torch.random.fork_rng():
        answers = runpy.run_path(script, run_name="vlm_colors")["main"]()
    assert [before == name for name, (before, _) in answers.items()] == [False] * 4
    assert [after == name for name, (_, after) in answers.items()] == [True] * 4


def test_micro_batches_with_images_equal_one_pass(engine):
    """Rows with images cut into micro-batches (and logits in chunks) give one pass's
    loss, logprobs and gradient; layer checkpointing picks the language model's layers."""
    from tinkerd.engine import Engine, EngineConfig
    from tinkerd.engine.memory import decoder_layers

    small = Engine(
        config=EngineConfig(micro_batch_tokens=20, logits_chunk_tokens=5, memory_budget_bytes=None)
    )
    data = [
        image_datum(),
        make_datum([*b"text row"]),
        image_datum(ImageChunk(data=png(BLUE, (48, 32)), format="png"), b" is blue!", 6),
    ]
    runs = [e.create_model(VL, LoraConfig(rank=4, seed=3)) for e in (small, engine)]
    try:
        a, b = (e.forward_backward(m, data, "cross_entropy") for e, m in zip((small, engine), runs))
        assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
        for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs):
            torch.testing.assert_close(
                x["logprobs"].to_torch(), y["logprobs"].to_torch(), atol=1e-5, rtol=0
            )
        for p, q in zip(small.run(runs[0]).params, engine.run(runs[1]).params, strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4)
        layers = decoder_layers(engine.run(runs[1]).base.model)
        language = engine.run(runs[1]).base.model.model.language_model.layers
        assert len(layers) == len(language) and all(x is y for x, y in zip(layers, language))
    finally:
        small.unload_model(runs[0])
        engine.unload_model(runs[1])


def test_tinkerd_http_client_trains_and_samples_with_images(vl_server):
    from tinkerd import ServiceClient

    service = ServiceClient(base_url=vl_server.url, api_key=KEYS[0])
    try:
        client = service.create_lora_training_client(VL, rank=8, seed=0)
        datum = image_datum()
        first = client.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
        client.optim_step(AdamParams(learning_rate=1e-2)).result()
        trained = client.forward([datum], "cross_entropy").result()
        assert trained.metrics["loss:sum"] < first
        sampler = client.save_weights_and_get_sampling_client("http")
        logprobs = sampler.compute_logprobs(datum.model_input).result()
        want = trained.loss_fn_outputs[0]["logprobs"].tolist()
        assert logprobs[6:] == pytest.approx(want[5:-1], abs=1e-4)
    finally:
        service.close()


def test_images_without_expected_tokens_through_the_client(engine):
    """Unset expected_tokens: the engine counts the image's positions itself (and writes
    them into the chunk); forward_backward and forward_backward_custom both run."""
    from tinkerd import ServiceClient
    from tinkerd.client.transport import InProcessTransport

    client = ServiceClient(transport=InProcessTransport(engine=engine))
    training = client.create_lora_training_client(VL, rank=4, seed=0)
    try:
        datum = image_datum(ImageChunk(data=png(size=(64, 64)), format="png"), b" is red", 16)
        out = training.forward_backward([datum], "cross_entropy").result()
        assert len(out.loss_fn_outputs[0]["logprobs"].tolist()) == 2 + 7 + 16
        assert datum.model_input.length == 25

        def loss_fn(data, logprobs):
            return -logprobs[0][-3:].sum(), {}

        custom = training.forward_backward_custom(
            [image_datum(ImageChunk(data=png(), format="png"))], loss_fn
        )
        assert len(custom.result().loss_fn_outputs[0]["logprobs"].tolist()) == 2 + 7 + 4
    finally:
        training.unload_model().result()


def test_two_ranks_train_with_images_like_one_process(engine, tmp_path):
    """`serve --nproc 2`: data with images split over two gloo ranks (each decodes its
    own share's images) train like one process."""
    from tinkerd import ServiceClient

    data = [
        image_datum(),
        image_datum(ImageChunk(data=png(BLUE, (48, 32)), format="png"), b" is blue!", 6),
        make_datum([*b"text"]),
    ]
    one = engine.create_model(VL, LoraConfig(rank=8, seed=2))
    server = ServerProcess(tmp_path, "--nproc", "2", "--model", VL)
    service = ServiceClient(base_url=server.url, api_key=KEYS[0])
    try:
        run = service.create_lora_training_client(VL, rank=8, seed=2)
        for _ in range(2):
            got = run.forward_backward(data, "cross_entropy")
            run.optim_step(AdamParams(learning_rate=1e-2))
            want = engine.forward_backward(one, data, "cross_entropy")
            engine.optim_step(one, AdamParams(learning_rate=1e-2))
            assert got.result().metrics["loss:sum"] == pytest.approx(
                want.metrics["loss:sum"], rel=1e-5
            )
        after = run.forward(data, "cross_entropy").result()
        for x, y in zip(after.loss_fn_outputs, engine.forward(one, data).loss_fn_outputs):
            torch.testing.assert_close(
                x["logprobs"].to_torch(), y["logprobs"].to_torch(), atol=1e-5, rtol=0
            )
    finally:
        service.close()
        server.stop()
        engine.unload_model(one)


def test_the_vision_tower_keeps_no_activations_for_the_backward(engine, vl_run):
    """A forward_backward saves as many bytes for its backward with a 16-token image as
    with 16 text tokens in its place: nothing of the frozen tower is kept."""

    def saved_bytes(model_input: ModelInput) -> int:
        n = model_input.length
        datum = Datum(
            model_input=model_input,
            loss_fn_inputs={"target_tokens": [97] * n, "weights": [1.0] * n},
        )
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            engine.forward_backward(vl_run, [datum])
        return total

    image = with_image(ImageChunk(data=png(size=(64, 64)), format="png", expected_tokens=16), b"a")
    text = ModelInput.from_ints([VISION_START, *b"b" * 16, VISION_END, *b"a"])
    assert abs(saved_bytes(image) - saved_bytes(text)) < 1024
