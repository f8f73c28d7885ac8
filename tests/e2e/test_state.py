"""save_state / load_state / create_training_client_from_state on both transports and with
the official SDK, and crash safety: kill -9 while a checkpoint is being written."""

import sys
import time

import pytest
import tinker
import torch
from helpers import KEYS, TESTS, TINY, ServerProcess, make_datum
from tinker import types

from tinkerd import ServiceClient
from tinkerd.errors import InvalidRequestError, NotFoundError
from tinkerd.types import AdamParams, SamplingParams

DATA = [make_datum([256, *b"resume me exactly"]), make_datum([256, *b"checkpoints"])]
ADAM = AdamParams(learning_rate=1e-2)


def train(client, steps: int) -> None:
    """`steps` pipelined steps, finished on return: a run trained while another run's
    requests are queued may share packed passes with it, which changes float rounding
    (not results beyond it; tests/unit/engine/test_multi_tenant.py), and this file checks bits."""
    for _ in range(steps):
        client.forward_backward(DATA)
        last = client.optim_step(ADAM)
    last.result()


def logprobs(client) -> torch.Tensor:
    out = client.forward(DATA).result()
    return torch.cat([o["logprobs"].to_torch() for o in out.loss_fn_outputs])


def test_resume_with_optimizer_is_bit_for_bit(service):
    straight = service.create_lora_training_client(TINY, rank=8, seed=3)
    train(straight, 3)
    path = straight.save_state("step-3").result().path
    assert path == f"tinker://{straight.model_id}/weights/step-3"
    train(straight, 3)

    resumed = service.create_training_client_from_state_with_optimizer(path)
    assert resumed.model_id != straight.model_id
    assert resumed.lora_config.rank == 8
    train(resumed, 3)
    assert torch.equal(logprobs(resumed), logprobs(straight))

    # Without the optimizer state the same 3 steps land elsewhere: the check above is
    # sensitive to the AdamW moments, not just to the weights.
    fresh = service.create_training_client_from_state(path)
    train(fresh, 3)
    assert not torch.allclose(logprobs(fresh), logprobs(straight), atol=1e-4)


def test_load_state_replaces_the_weights_of_a_live_run(service):
    source = service.create_lora_training_client(TINY, rank=8, seed=1)
    train(source, 4)
    path = source.save_state("trained").result().path
    target = service.create_lora_training_client(TINY, rank=8, seed=2)
    assert not torch.allclose(logprobs(target), logprobs(source))
    target.load_state(path).result()
    assert torch.equal(logprobs(target), logprobs(source))
    target.load_state_with_optimizer(path).result()
    train(target, 1)  # and it keeps training
    assert not torch.equal(logprobs(target), logprobs(source))


def test_bad_checkpoint_requests_fail_clearly_and_change_nothing(service):
    client = service.create_lora_training_client(TINY, rank=8, seed=5)
    train(client, 1)
    before = logprobs(client)
    with pytest.raises(InvalidRequestError, match="invalid checkpoint name"):
        client.save_state("../escape").result()
    with pytest.raises(NotFoundError):
        client.load_state(f"tinker://{client.model_id}/weights/never-saved").result()
    with pytest.raises(InvalidRequestError, match="tinker://"):
        client.load_state("/etc/passwd").result()
    sampler_path = client.save_weights_for_sampler("for-sampling").result().path
    with pytest.raises(InvalidRequestError, match="optimizer"):
        client.load_state_with_optimizer(sampler_path).result()
    other_rank = service.create_lora_training_client(TINY, rank=4, seed=5)
    wrong_shape = other_rank.save_state("rank-4").result().path
    with pytest.raises(InvalidRequestError, match="does not fit"):
        client.load_state(wrong_shape).result()
    path = client.save_state("once").result().path
    with pytest.raises(InvalidRequestError, match="already exists"):
        client.save_state("once").result()
    assert torch.equal(logprobs(client), before)  # every refused request left it as it was
    client.load_state(sampler_path).result()  # sampler weights load as weights
    assert torch.equal(logprobs(client), before)
    with pytest.raises(NotFoundError):
        service.create_training_client_from_state(path.replace("once", "nope"))


def test_sdk_save_state_and_resume(server):
    sdk = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(d.model_input.to_ints()),
            loss_fn_inputs={k: v.tolist() for k, v in d.loss_fn_inputs.items()},
        )
        for d in DATA
    ]
    adam = types.AdamParams(learning_rate=1e-2)

    def train_sdk(client, steps):
        for _ in range(steps):
            client.forward_backward(data, "cross_entropy")
            client.optim_step(adam).result()

    def sdk_logprobs(client):
        out = client.forward(data, "cross_entropy").result()
        return torch.cat([torch.tensor(o["logprobs"].tolist()) for o in out.loss_fn_outputs])

    straight = sdk.create_lora_training_client(base_model=TINY, rank=8, seed=4).result()
    train_sdk(straight, 2)
    path = straight.save_state("sdk-step-2").result().path
    train_sdk(straight, 2)
    resumed = sdk.create_training_client_from_state_with_optimizer(path).result()
    train_sdk(resumed, 2)
    assert torch.equal(sdk_logprobs(resumed), sdk_logprobs(straight))

    rest = tinker.RestClient(base_url=server.url, api_key=KEYS[0])
    info = rest.get_weights_info_by_tinker_path(path).result()
    assert (info.base_model, info.lora_rank, info.is_lora) == (TINY, 8, True)

    legacy = sdk.create_lora_training_client(base_model=TINY, rank=8, seed=9).result()
    with pytest.warns(FutureWarning):  # deprecated in the SDK, still works
        legacy.load_state(path).result()
    straight_at_2 = sdk.create_training_client_from_state(path).result()
    assert torch.equal(sdk_logprobs(legacy), sdk_logprobs(straight_at_2))

    # Another key cannot see the checkpoint, let alone load it.
    bob = tinker.ServiceClient(base_url=server.url, api_key=KEYS[1])
    with pytest.raises(tinker.NotFoundError):
        tinker.RestClient(base_url=server.url, api_key=KEYS[1]).get_weights_info_by_tinker_path(
            path
        ).result()
    with pytest.raises(Exception, match="no checkpoint"):
        bob.create_training_client_from_state(path).result()
    sdk.close("success").result()
    bob.close("success").result()


def test_kill_during_save_loses_nothing(tmp_path):
    """kill -9 while checkpoint "b" is being written: after a restart "b" is absent (not
    half there), "a" and the named sampler weights load, and training resumes from "a"."""
    data_dir = tmp_path / "data"
    stall_b = [sys.executable, str(TESTS / "stalled_save_server.py"), "b", "60"]
    server = ServerProcess(data_dir, launcher=stall_b)
    service = ServiceClient(base_url=server.url, api_key=KEYS[0])
    client = service.create_lora_training_client(TINY, rank=8, seed=7)
    train(client, 2)
    path_a = client.save_state("a").result().path
    sampler = client.save_weights_and_get_sampling_client("sampled")
    prompt = make_datum([256, *b"abc"]).model_input
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    tokens = sampler.sample(prompt, 1, greedy).result().sequences[0].tokens
    train(client, 1)
    expected = logprobs(client)  # what resuming from "a" and one step must reproduce
    client.save_state("b")  # held just before its rename by stalled_save_server.py
    run_dir = data_dir / "checkpoints" / client.model_id / "weights"
    deadline = time.time() + 60
    while not list(run_dir.glob(".tmp-new-b-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(run_dir.glob(".tmp-new-b-*")), "the save of b never started"
    server.stop(kill=True)
    service.close()

    server.start()
    try:
        service = ServiceClient(base_url=server.url, api_key=KEYS[0])
        assert sorted(p.name for p in run_dir.iterdir()) == ["a"]  # no temp dir, no b
        with pytest.raises(NotFoundError):
            service.create_training_client_from_state(path_a.replace("/a", "/b"))
        resumed = service.create_training_client_from_state_with_optimizer(path_a)
        train(resumed, 1)
        assert torch.equal(logprobs(resumed), expected)
        reloaded = service.create_sampling_client(
            model_path=f"tinker://{client.model_id}/sampler_weights/sampled"
        )
        assert reloaded.sample(prompt, 1, greedy).result().sequences[0].tokens == tokens
        service.close()
    finally:
        server.stop()


def test_a_save_complete_at_a_crash_is_reported_done_after_restart(tmp_path):
    """kill -9 after checkpoint "b" is complete on disk but before its answer was recorded:
    after the restart the official SDK's save future resolves to b's path (not "server
    restarted"), so nobody retries into "already exists"; b is listed and loads."""
    data_dir = tmp_path / "data"
    stall_b = [sys.executable, str(TESTS / "stalled_save_server.py"), "b", "60"]
    after = {"TINKERD_TEST_STALL_AFTER": "1"}
    server = ServerProcess(data_dir, launcher=stall_b, env=after)
    try:
        sdk = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
        client = sdk.create_lora_training_client(base_model=TINY, rank=2).result()
        future = client.save_state("b")
        final = data_dir / "checkpoints" / client.model_id / "weights" / "b"
        deadline = time.time() + 60
        while not (final / "tinkerd.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (final / "tinkerd.json").exists(), "the save of b never finished"
        server.stop(kill=True)
        server.start(env=after)
        path = f"tinker://{client.model_id}/weights/b"
        assert future.result(timeout=120).path == path
        fresh = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
        rest = tinker.RestClient(base_url=server.url, api_key=KEYS[0])
        listed = rest.list_checkpoints(client.model_id).result()
        assert [c.tinker_path for c in listed.checkpoints] == [path]
        fresh.create_training_client_from_state(path).result()
    finally:
        server.stop()
