"""Dimuon end to end: a run created with DimuonOptimizerConfig steps with DimuonParams
(every field honoured), reports its optimizer, and resumes bit for bit from a checkpoint;
params of the other optimizer are a 400 naming both. Through the engine, tinkerd's own
clients (embedded and HTTP), the official `tinker` SDK, and two data-parallel ranks.
The update direction itself is checked against NumPy in test_optimizers.py."""

import json
import math
import time

import httpx
import pytest
import tinker
import torch
from helpers import KEYS, TINY, ServerProcess, make_datum
from tinker import types as sdk_types

from tinkerd import (
    AdamOptimizerConfig,
    AdamParams,
    DimuonOptimizerConfig,
    DimuonParams,
    ServiceClient,
)
from tinkerd.client.transport import InProcessTransport
from tinkerd.engine.checkpoint_format import META_FILE
from tinkerd.errors import InvalidRequestError
from tinkerd.types import LoraConfig, optim_params_from

DATA = [
    make_datum([256, *b"dimuon trains lora"]),
    make_datum([256, *b"a fixed batch"]),
]
STEP = DimuonParams(learning_rate=2e-2, grad_clip_norm=50.0, beta1=0.8)
RANK = 8


def new_dimuon_run(engine, seed: int = 0) -> str:
    lora = LoraConfig(rank=RANK, seed=seed)
    return engine.create_model(TINY, lora, optimizer_config=DimuonOptimizerConfig())


def weights(engine, model_id: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.run(model_id).params]


# ---------------------------------------------------------------- the engine


def test_a_step_moves_each_matrix_by_the_rate_along_a_direction_of_norm_sqrt_rank(engine):
    model_id = new_dimuon_run(engine)
    before = weights(engine, model_id)
    engine.forward_backward(model_id, DATA)
    moved = [bool(p.grad.abs().sum() > 0) for p in engine.run(model_id).params]
    params = DimuonParams(
        learning_rate=1e-3, rank_lr_correction_exponent=0.5, beta1=0.7, damping=1e-3
    )
    metrics = engine.optim_step(model_id, params).metrics
    assert (
        metrics["optim/step"] == 1 and metrics["learning_rate"] == 1e-3 and metrics["grad_norm"] > 0
    )
    # B starts at 0, so every lora_A has a zero gradient, zero momentum and stays put
    assert any(moved) and not all(moved)
    rate = 1e-3 * (32 / RANK) ** 0.5  # the rank correction relative to rank 32
    for b, a, m in zip(before, weights(engine, model_id), moved):
        if m:
            norm = torch.linalg.matrix_norm(b - a).item()
            assert norm == pytest.approx(rate * math.sqrt(RANK), rel=1e-4)
        else:
            assert torch.equal(a, b)
    engine.unload_model(model_id)


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", 3e-2),
        ("grad_clip_norm", 1.0),
        ("beta1", 0.0),
        ("damping", 10.0),
        ("rank_lr_correction_exponent", 0.0),
    ],
)
def test_every_dimuon_field_changes_the_update(engine, field, value):
    """Two steps with the defaults, then with one field changed: the weights differ (a
    field dropped on the way would leave them equal)."""
    base = {"learning_rate": 1e-2}
    runs = []
    for params in (DimuonParams(**base), DimuonParams(**base | {field: value})):
        model_id = new_dimuon_run(engine)
        for data in (DATA, DATA[:1]):  # two different gradients, so momentum matters
            engine.forward_backward(model_id, data)
            engine.optim_step(model_id, params)
        runs.append(weights(engine, model_id))
        engine.unload_model(model_id)
    assert any(not torch.equal(a, b) for a, b in zip(*runs))


def test_params_of_the_other_optimizer_are_refused_naming_both(engine):
    dimuon = new_dimuon_run(engine)
    adam = engine.create_model(TINY, LoraConfig(rank=RANK, seed=0))
    for model_id, wrong in ((dimuon, AdamParams()), (adam, DimuonParams(learning_rate=1e-3))):
        engine.forward_backward(model_id, DATA)
        before = weights(engine, model_id)
        with pytest.raises(
            InvalidRequestError, match="AdamParams.*DimuonParams|DimuonParams.*AdamParams"
        ):
            engine.optim_step(model_id, wrong)
        assert all(torch.equal(a, b) for a, b in zip(before, weights(engine, model_id)))
        assert engine.run(model_id).step == 0
    engine.optim_step(dimuon, STEP)  # the gradients were kept: the right params still step
    assert engine.run(dimuon).step == 1
    for model_id in (dimuon, adam):
        engine.unload_model(model_id)


def test_optimizer_state_loads_only_into_a_run_of_the_same_optimizer(engine):
    dimuon = new_dimuon_run(engine)
    engine.forward_backward(dimuon, DATA)
    engine.optim_step(dimuon, STEP)
    path = engine.save_state(dimuon, "dimuon-for-adam").tinker_path
    assert engine.weights_info(path).optimizer_config == DimuonOptimizerConfig()
    adam = engine.create_model(TINY, LoraConfig(rank=RANK, seed=0))
    with pytest.raises(InvalidRequestError, match="'dimuon'.*'adamw'"):
        engine.load_state(adam, path, with_optimizer=True)
    engine.load_state(adam, path, with_optimizer=False)  # the weights alone: fine
    with pytest.raises(InvalidRequestError, match="cannot override"):
        engine.create_model_from_state(path, True, None, AdamOptimizerConfig())
    weights_only = engine.create_model_from_state(path, False, None, AdamOptimizerConfig())
    assert engine.get_info(weights_only).optimizer_config == AdamOptimizerConfig()
    for model_id in (dimuon, adam, weights_only):
        engine.unload_model(model_id)


def test_adam_checkpoints_from_before_the_optimizer_was_recorded_still_load(engine):
    model_id = engine.create_model(TINY, LoraConfig(rank=RANK, seed=0))
    engine.forward_backward(model_id, DATA)
    engine.optim_step(model_id, AdamParams(learning_rate=1e-2))
    info = engine.save_state(model_id, "old-adam")
    meta = json.loads((info.path / META_FILE).read_text())
    del meta["optimizer_config"]  # as tinkerd wrote it before Dimuon
    (info.path / META_FILE).write_text(json.dumps(meta))
    assert engine.weights_info(info.tinker_path).optimizer_config == AdamOptimizerConfig()
    resumed = engine.create_model_from_state(info.tinker_path, True)
    state = engine.run(resumed).optimizer.state
    original = engine.run(model_id).optimizer.state
    for p, q in zip(engine.run(resumed).params, engine.run(model_id).params):
        assert torch.equal(state[p]["exp_avg_sq"], original[q]["exp_avg_sq"])
    for run in (model_id, resumed):
        engine.unload_model(run)


# ---------------------------------------------------------------- tinkerd's clients


def step(client, params) -> float:
    loss = client.forward_backward(DATA, "cross_entropy")
    client.optim_step(params).result()
    return loss.result().metrics["loss:sum"]


def logprobs(client) -> list[list[float]]:
    out = client.forward(DATA, "cross_entropy").result()
    return [o["logprobs"].tolist() for o in out.loss_fn_outputs]


def test_tinkerd_clients_train_with_dimuon_and_resume_bit_for_bit(service):
    client = service.create_lora_training_client(
        TINY, rank=RANK, seed=0, optimizer=DimuonOptimizerConfig()
    )
    assert client.get_info().optimizer_config == DimuonOptimizerConfig()
    losses = [step(client, STEP) for _ in range(4)]
    assert losses[-1] < 0.8 * losses[0], losses
    path = client.save_state("dimuon-4").result().path
    resumed = service.create_training_client_from_state_with_optimizer(path)
    assert resumed.get_info().optimizer_config == DimuonOptimizerConfig()
    fresh = service.create_training_client_from_state(path, optimizer=DimuonOptimizerConfig())
    for c in (client, resumed, fresh):
        step(c, STEP)
    assert logprobs(resumed) == logprobs(client)  # momentum restored: the very same step
    assert logprobs(fresh) != logprobs(client)  # without it, another step
    with pytest.raises(InvalidRequestError, match="AdamParams.*DimuonParams"):
        client.optim_step(AdamParams(learning_rate=1e-3)).result()
    for c in (client, resumed, fresh):
        c.unload_model().result()


# ---------------------------------------------------------------- the official SDK


def sdk_datum(datum) -> sdk_types.Datum:
    tokens = datum.model_input.to_ints()
    return sdk_types.Datum(
        model_input=sdk_types.ModelInput.from_ints(tokens),
        loss_fn_inputs={k: v.tolist() for k, v in datum.loss_fn_inputs.items()},
    )


def test_official_sdk_trains_with_dimuon_and_resumes_bit_for_bit(server):
    sdk = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
    data = [sdk_datum(d) for d in DATA]
    params = sdk_types.DimuonParams(learning_rate=2e-2, grad_clip_norm=50.0, beta1=0.8)

    def sdk_step(client) -> float:
        loss = client.forward_backward(data, "cross_entropy")
        client.optim_step(params).result()
        return loss.result().metrics["loss:sum"]

    def sdk_logprobs(client) -> list[list[float]]:
        out = client.forward(data, "cross_entropy").result()
        return [o["logprobs"].tolist() for o in out.loss_fn_outputs]

    client = sdk.create_lora_training_client(
        base_model=TINY, rank=RANK, seed=0, optimizer=sdk_types.DimuonOptimizerConfig()
    ).result()
    assert client.get_info().optimizer_config.type == "dimuon"
    losses = [sdk_step(client) for _ in range(4)]
    assert losses[-1] < 0.8 * losses[0], losses
    path = client.save_state("dimuon-4").result().path
    rest = tinker.RestClient(base_url=server.url, api_key=KEYS[0])
    info = rest.get_weights_info_by_tinker_path(path).result()
    assert info.optimizer_config.type == "dimuon"
    resumed = sdk.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.get_info().optimizer_config.type == "dimuon"
    fresh = sdk.create_training_client_from_state(
        path, optimizer=sdk_types.DimuonOptimizerConfig()
    ).result()
    for c in (client, resumed, fresh):
        sdk_step(c)
    assert sdk_logprobs(resumed) == sdk_logprobs(client)
    assert sdk_logprobs(fresh) != sdk_logprobs(client)
    # weights alone, no optimizer named: AdamW, as the SDK documents
    adam = sdk.create_training_client_from_state(path).result()
    assert adam.get_info().optimizer_config.type == "adamw"

    client.forward_backward(data, "cross_entropy").result()
    with pytest.raises(tinker.BadRequestError, match="AdamParams.*DimuonParams"):
        client.optim_step(sdk_types.AdamParams(learning_rate=1e-3)).result()
    adam.forward_backward(data, "cross_entropy").result()
    with pytest.raises(tinker.BadRequestError, match="DimuonParams.*AdamParams"):
        adam.optim_step(params).result()
    sdk.close("success").result()


def test_unknown_optimizer_types_and_bad_params_are_a_400_naming_them(server):
    headers = {"X-API-Key": KEYS[0]}
    post = lambda path, body: httpx.post(  # noqa: E731
        f"{server.url}/api/v1/{path}", headers=headers, json=body, timeout=60
    )
    session = post("create_session", {}).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": TINY}
    body["lora_config"] = {"rank": RANK}
    for config, message in (
        ({"type": "sgd"}, "unknown optimizer type 'sgd'"),
        ({"type": "dimuon", "version": 2}, "DimuonOptimizerConfig"),
        ({"type": "dimuon", "momentum": 0.5}, "no field"),
    ):
        response = post("create_model", body | {"optimizer_config": config})
        assert response.status_code == 400, response.text
        assert message in response.text
    # an existing run keeps its optimizer: a legacy load_weights may not change it
    created = post("create_model", body | {"optimizer_config": {"type": "dimuon"}})
    answer = post("retrieve_future", {"request_id": created.json()["request_id"]})
    while answer.status_code == 408:  # long-poll: not done yet
        answer = post("retrieve_future", {"request_id": created.json()["request_id"]})
    model_id = answer.json()["model_id"]
    load = {"model_id": model_id, "seq_id": 1, "path": f"tinker://{model_id}/weights/x"}
    response = post("load_weights", load | {"optimizer": False, "optimizer_config": {}})
    assert response.status_code == 400 and "unknown optimizer type None" in response.text
    load |= {"seq_id": 2, "optimizer_config": {"type": "adamw"}}
    response = post("load_weights", load)
    assert response.status_code == 400 and "cannot change" in response.text, response.text
    info = post("get_info", {"model_id": model_id}).json()
    assert info["optimizer_config"] == {"type": "dimuon", "version": 1}
    # both refusals used up their seq_id: the next request runs at once (no 60 s gap wait)
    params = {"type": "dimuon", "learning_rate": 1e-3}
    step = post("optim_step", {"model_id": model_id, "seq_id": 3, "optimizer_params": params})
    started = time.monotonic()
    answer = post("retrieve_future", {"request_id": step.json()["request_id"]})
    while answer.status_code == 408:
        answer = post("retrieve_future", {"request_id": step.json()["request_id"]})
    assert answer.status_code == 200 and answer.json()["metrics"]["optim/step"] == 1
    assert time.monotonic() - started < 30
    for bad, message in (
        ({"type": "lion", "learning_rate": 1.0}, "unknown optimizer params type 'lion'"),
        ({"type": "dimuon"}, "learning_rate"),
        ({"type": "dimuon", "learning_rate": 1.0, "beta1": 1.0}, "beta1"),
        ({"type": "dimuon", "learning_rate": 1.0, "nesterov": True}, "nesterov"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            optim_params_from(bad)


# ---------------------------------------------------------------- data-parallel ranks


def test_two_ranks_train_with_dimuon_like_one_process(engine, tmp_path):
    reference = ServiceClient(transport=InProcessTransport(engine=engine))
    one = reference.create_lora_training_client(
        TINY, rank=RANK, seed=5, optimizer=DimuonOptimizerConfig()
    )
    server = ServerProcess(tmp_path, "--nproc", "2")
    try:
        service = ServiceClient(base_url=server.url, api_key=KEYS[0])
        two = service.create_lora_training_client(
            TINY, rank=RANK, seed=5, optimizer=DimuonOptimizerConfig()
        )
        assert [step(two, STEP) for _ in range(3)] == pytest.approx(
            [step(one, STEP) for _ in range(3)], rel=1e-4
        )
        got, expected = logprobs(two), logprobs(one)
        for a, b in zip(got, expected):
            assert a == pytest.approx(b, abs=1e-4)
        service.close()
    finally:
        server.stop()
