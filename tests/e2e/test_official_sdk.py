"""The official `tinker` SDK, unmodified, against `tinkerd serve` on loopback."""

import asyncio
import json

import httpx
import pytest
import tinker
import torch
from helpers import (
    KEYS,
    TINY,
    ServerProcess,
    fwd_bwd_body,
    gspo_case,
    post,
    raw_model,
    retrieve,
    sdk_datum,
)
from tinker import types

from tinkerd.types import AdamParams

ADAM = types.AdamParams(learning_rate=3e-3)


@pytest.fixture
def sdk(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
    yield client
    client.close("success").result()


def new_run(sdk, seed=0):
    return sdk.create_lora_training_client(base_model=TINY, rank=8, seed=seed).result()


def test_sdk_trains_and_the_loss_falls(sdk):
    client = new_run(sdk)
    data = [sdk_datum(b"hello tinkerd"), sdk_datum(b"official sdk")]
    losses = []
    for _ in range(10):
        fwd_bwd = client.forward_backward(data, "cross_entropy")
        optim = client.optim_step(ADAM)
        losses.append(fwd_bwd.result().metrics["loss:sum"])
        assert optim.result().metrics["grad_norm"] > 0
    assert losses[-1] < 0.4 * losses[0], losses
    out = client.forward(data, "cross_entropy").result()
    assert len(out.loss_fn_outputs) == 2
    assert len(out.loss_fn_outputs[0]["logprobs"].tolist()) == 13


def test_sdk_gspo_loss_and_gradient(sdk):
    """loss_fn="gspo" through the official SDK: the hand-computed loss of
    helpers.gspo_case, and the gradient of cross_entropy with the hand weights."""
    texts = [b"gspo one", b"and two"]
    bases = [sdk_datum(t) for t in texts]
    out = new_run(sdk, seed=23).forward(bases, "cross_entropy").result()
    inputs, loss_sum, weights = gspo_case([o["logprobs"].tolist() for o in out.loss_fn_outputs])
    data = [
        types.Datum(
            model_input=b.model_input,
            loss_fn_inputs={
                "target_tokens": b.loss_fn_inputs["target_tokens"],
                "logprobs": i["logprobs"],
                "advantages": i["advantages"],
                "sequence_ratio_mask": i["mask"],
            },
        )
        for b, i in zip(bases, inputs)
    ]
    client = new_run(sdk, seed=23)
    result = client.forward_backward(data, "gspo").result()
    assert result.metrics["loss:sum"] == pytest.approx(loss_sum, abs=1e-4)
    norm = client.optim_step(ADAM).result().metrics["grad_norm"]
    reference = new_run(sdk, seed=23)
    reference.forward_backward([sdk_datum(t, w) for t, w in zip(texts, weights)], "cross_entropy")
    assert norm == pytest.approx(reference.optim_step(ADAM).result().metrics["grad_norm"], rel=1e-4)


def test_sdk_async_api_pipelines(sdk):
    data = [sdk_datum(b"async pipelining")]

    async def main():
        client = await sdk.create_lora_training_client_async(base_model=TINY, rank=8, seed=1)
        futures = []
        for _ in range(3):  # queue everything, then wait
            futures.append(await client.forward_backward_async(data, "cross_entropy"))
            futures.append(await client.optim_step_async(ADAM))
        results = [await f for f in futures]
        return [r.metrics["loss:sum"] for r in results[::2]], results[-1].metrics["optim/step"]

    losses, steps = asyncio.run(main())
    assert steps == 3.0
    assert losses[2] < losses[1] < losses[0]


def test_sdk_forward_backward_custom_gives_the_built_in_gradient(sdk):
    """A custom loss sum(-w * logprobs) run by the SDK's two-phase protocol moves the model
    exactly like the built-in cross_entropy with weights w."""
    weights = [1.0, -0.5, 2.0, 0.0, 0.25, 1.5, -1.0, 0.75, 1.0]
    data = [sdk_datum(b"custom is", weights)]
    custom_weights = torch.tensor(weights)

    def loss_fn(batch, logprobs_list):
        loss = sum((-custom_weights * lp).sum() for lp in logprobs_list)
        return loss, {"custom_metric:sum": 1.0}

    custom, builtin = new_run(sdk, seed=5), new_run(sdk, seed=5)
    custom_out = custom.forward_backward_custom(data, loss_fn).result()
    builtin_out = builtin.forward_backward(data, "cross_entropy").result()
    assert custom_out.metrics["loss:sum"] == pytest.approx(builtin_out.metrics["loss:sum"], 1e-5)
    norm_custom = custom.optim_step(ADAM).result().metrics["grad_norm"]
    norm_builtin = builtin.optim_step(ADAM).result().metrics["grad_norm"]
    assert norm_custom == pytest.approx(norm_builtin, rel=1e-5)
    after_custom = custom.forward(data, "cross_entropy").result().loss_fn_outputs[0]
    after_builtin = builtin.forward(data, "cross_entropy").result().loss_fn_outputs[0]
    assert after_custom["logprobs"].tolist() == pytest.approx(
        after_builtin["logprobs"].tolist(), abs=1e-5
    )


def test_sdk_get_tokenizer_works_offline(sdk):
    tokenizer = new_run(sdk).get_tokenizer()
    assert tokenizer.encode("tinkerd", add_special_tokens=False) == list(b"tinkerd")
    assert tokenizer.decode(list("héllo".encode())) == "héllo"


def test_sdk_sees_the_served_models(server):
    rest = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0]).create_rest_client()
    caps = rest.get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == [TINY]


def test_sdk_bad_tokens_fail_clearly_and_the_server_keeps_serving(sdk):
    client = new_run(sdk)
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 99999]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(tinker.BadRequestError, match="outside the vocabulary"):
        client.forward_backward([bad], "cross_entropy").result()
    # The run (and its seq_id order) is intact: the next request runs normally.
    out = client.forward_backward([sdk_datum(b"still fine")], "cross_entropy").result()
    assert out.metrics["loss:sum"] > 0


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("create_session", b"{not json", 422, "JSON"),
        (
            "create_model",
            {
                "session_id": "x",
                "model_seq_id": 0,
                "base_model": TINY,
                "lora_config": {"rank": "big"},
            },
            422,
            "lora_config.rank",
        ),
        ("optim_step", {"model_id": "session-nope:train:0", "seq_id": 1}, 404, "no training run"),
        ("get_info", {"model_id": "nope"}, 404, "no training run"),
        ("forward_backward", b"\x0a\x05hello\x99", 400, "ForwardBackwardRequest"),
        ("retrieve_future", {"request_id": "req-unknown"}, 404, "no request"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, path, body, status, message):
    if isinstance(body, bytes):
        content_type = (
            "application/x-protobuf" if path == "forward_backward" else "application/json"
        )
        response = httpx.post(
            f"{server.url}/api/v1/{path}",
            content=body,
            headers={"X-API-Key": KEYS[0], "Content-Type": content_type},
        )
    else:
        response = post(server, path, json=body)
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert httpx.get(f"{server.url}/api/v1/healthz").status_code == 200


def test_api_keys_are_required_and_runs_are_private(server, sdk):
    assert post(server, "create_session", key="", json={}).status_code == 401
    assert post(server, "create_session", key="tml-wrong", json={}).status_code == 401
    alice = new_run(sdk)
    model_id = alice.model_id
    bob = {"key": KEYS[1]}
    assert post(server, "get_info", json={"model_id": model_id}, **bob).status_code == 404
    assert (
        post(server, "optim_step", json={"model_id": model_id, "seq_id": 99}, **bob).status_code
        == 404
    )
    request_id = post(server, "unload_model", json={"model_id": model_id}, **bob)
    assert request_id.status_code == 404
    listed = httpx.get(f"{server.url}/api/v1/training_runs", headers={"X-API-Key": KEYS[1]})
    assert model_id not in json.dumps(listed.json())
    mine = httpx.get(
        f"{server.url}/api/v1/training_runs?limit=1000", headers={"X-API-Key": KEYS[0]}
    )
    assert model_id in [r["training_run_id"] for r in mine.json()["training_runs"]]
    # Alice's future is invisible to Bob.
    fb = post(server, "optim_step", json={"model_id": model_id, "seq_id": 1})
    request_id = fb.json()["request_id"]
    assert (
        post(server, "retrieve_future", json={"request_id": request_id}, **bob).status_code == 404
    )
    assert retrieve(server, request_id).status_code == 200


def test_requests_run_in_seq_id_order_and_resends_are_deduplicated(server):
    model_id = raw_model(server)
    adam = AdamParams(learning_rate=1e-3).model_dump()
    # seq 2 (optim_step) arrives before seq 1 (forward_backward) but must run after it.
    step = post(
        server, "optim_step", json={"model_id": model_id, "seq_id": 2, "adam_params": adam}
    ).json()["request_id"]
    fb = post(server, "forward_backward", content=fwd_bwd_body(model_id, 1)).json()["request_id"]
    again = post(server, "forward_backward", content=fwd_bwd_body(model_id, 1)).json()
    assert again["request_id"] == fb
    result = retrieve(server, step).json()
    assert result["metrics"]["grad_norm"] > 0  # it saw the gradient of seq 1


def test_pending_futures_answer_408_try_again(server):
    model_id = raw_model(server)
    # seq 5 waits for seqs 1-4, which never come: the poll answers try_again.
    waiting = post(server, "optim_step", json={"model_id": model_id, "seq_id": 5}).json()
    response = post(server, "retrieve_future", json={"request_id": waiting["request_id"]})
    assert response.status_code == 408
    assert response.json()["type"] == "try_again" and response.json()["queue_state"] == "active"


def test_finished_results_survive_reconnects_and_restarts(tmp_path):
    first = ServerProcess(tmp_path)
    try:
        model_id = raw_model(first)
        request_id = post(first, "optim_step", json={"model_id": model_id, "seq_id": 1}).json()[
            "request_id"
        ]
        result = retrieve(first, request_id)
        assert result.status_code == 200
    finally:
        first.stop()
    second = ServerProcess(tmp_path)
    try:
        again = retrieve(second, request_id)
        assert again.status_code == 200 and again.content == result.content
    finally:
        second.stop()


def test_serve_refuses_open_non_loopback_binding(capsys, monkeypatch):
    from tinkerd import cli

    # `tinkerd serve`'s own code, in this process (a subprocess only re-imported torch);
    # should the refusal break, the test fails instead of serving.
    monkeypatch.setenv("TINKERD_API_KEYS", "")
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("served"))
    capsys.readouterr()
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_sdk_samples_with_logprobs_that_match_training(sdk):
    client = new_run(sdk)
    for _ in range(3):
        client.forward_backward([sdk_datum(b"abcabc")], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=2e-2))
    sampler = client.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints([256, *b"abc"])
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=4, stop=[])
    result = sampler.sample(prompt, 3, params, include_prompt_logprobs=True).result()
    assert len(result.sequences) == 3 and len({s.sequence_id for s in result.sequences}) == 3
    for seq in result.sequences:
        tokens = [256, *b"abc", *seq.tokens]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        out = client.forward([datum], "cross_entropy").result()
        trained = out.loss_fn_outputs[0]["logprobs"].to_torch()
        assert torch.allclose(torch.tensor(seq.logprobs), trained[3:], atol=1e-4)
        assert seq.stop_reason == "length" and len(seq.tokens) == 8
        assert torch.allclose(torch.tensor(result.prompt_logprobs[1:]), trained[:3], atol=1e-4)
    assert sampler.compute_logprobs(prompt).result()[1:] == pytest.approx(
        result.prompt_logprobs[1:], abs=1e-5
    )
    last = sampler.compute_logprobs(prompt, prompt_logprobs_last_n=1).result()
    assert last[:-1] == [None] * 3 and last[-1] == pytest.approx(result.prompt_logprobs[-1])


def test_sdk_named_sampler_weights_and_base_sampling(sdk):
    client = new_run(sdk, seed=2)
    path = client.save_weights_for_sampler("first").result().path
    assert path == f"tinker://{client.model_id}/sampler_weights/first"
    prompt = types.ModelInput.from_ints([256, *b"hi"])
    params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    from_path = (
        sdk.create_sampling_client(model_path=path).result().sample(prompt, 1, params).result()
    )
    from_base = (
        sdk.create_sampling_client(base_model=TINY).result().sample(prompt, 1, params).result()
    )
    # a fresh LoRA (B = 0) is the base model exactly: greedy decoding agrees
    assert from_path.sequences[0].tokens == from_base.sequences[0].tokens
    assert sdk.create_sampling_client(model_path=path).result().get_base_model() == TINY
    # Both (as tinker-cookbook's on-policy distillation passes them): the path is sampled,
    # and a base model that is not the weights' own is refused.
    both = sdk.create_sampling_client(base_model=TINY, model_path=path).result()
    assert both.sample(prompt, 1, params).result().sequences[0].tokens == (
        from_path.sequences[0].tokens
    )
    with pytest.raises(tinker.BadRequestError, match="was trained on"):
        sdk.create_sampling_client(base_model="tinkerd/tiny-chat", model_path=path).result()


def test_tinkerd_client_takes_base_model_and_model_path_together(server):
    from tinkerd import ServiceClient
    from tinkerd.errors import InvalidRequestError

    service = ServiceClient(base_url=server.url, api_key=KEYS[0])
    client = service.create_lora_training_client(TINY, rank=4, seed=2)
    path = client.save_weights_for_sampler("both").result().path
    sampler = service.create_sampling_client(base_model=TINY, model_path=path)
    from tinkerd.types import ModelInput, SamplingParams

    prompt = ModelInput.from_ints([256, *b"hi"])
    out = sampler.sample(prompt, 1, SamplingParams(max_tokens=3, temperature=0.0, stop=[]))
    assert len(out.result().sequences[0].tokens) == 3
    with pytest.raises(InvalidRequestError, match="give model_path or base_model"):
        service.create_sampling_client()
    service.close()


def test_sdk_bad_sample_requests_are_400(sdk):
    sampler = sdk.create_sampling_client(base_model=TINY).result()
    for prompt, params in [
        ([256, 5000], types.SamplingParams(max_tokens=2)),
        ([256], types.SamplingParams(max_tokens=0)),
        ([256], types.SamplingParams(max_tokens=2, top_p=2.0)),
    ]:
        with pytest.raises(tinker.BadRequestError):
            sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result()
