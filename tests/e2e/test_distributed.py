"""`tinkerd serve --nproc 2`: two CPU ranks over gloo train like one process, with and
without FSDP2, and a checkpoint saved under one layout resumes under the other."""

import contextlib
from collections.abc import Iterator

import pytest
import torch
from helpers import KEYS, NLL_RANKS, TINY, ServerProcess, make_datum, weighted_nll

from tinkerd import ServiceClient
from tinkerd.client.transport import InProcessTransport
from tinkerd.errors import InvalidRequestError
from tinkerd.types import AdamParams, SamplingParams

FIVE = [make_datum([256, *f"datum {i} of an uneven batch".encode()]) for i in range(5)]
ONE = [make_datum([256, *b"a batch of one leaves a rank idle"])]
TWO_RANKS = ("--nproc", "2")


def train(client, steps: int = 3) -> list[float]:
    losses = []
    for i in range(steps):
        future = client.forward_backward(ONE if i == 1 else FIVE)
        client.optim_step(AdamParams(learning_rate=1e-2))
        losses.append(future.result().metrics["loss:sum"])
    return losses


def logprobs(client) -> torch.Tensor:
    out = client.forward(FIVE).result()
    return torch.cat([o["logprobs"].to_torch() for o in out.loss_fn_outputs])


@contextlib.contextmanager
def serving(data_dir, *layout: str) -> Iterator[ServiceClient]:
    server = ServerProcess(data_dir, *layout)
    service = ServiceClient(base_url=server.url, api_key=KEYS[0])
    try:
        yield service
        service.close()
    finally:
        server.stop()


def train_and_save(service, reference, one, fsdp: bool) -> tuple[str, torch.Tensor]:
    """A run on `service` trains like `one` (of `reference`, in this process), then saves its
    state; returns the checkpoint's path and the run's logprobs when saved."""
    run = service.create_lora_training_client(TINY, rank=8, seed=11)
    assert train(run) == pytest.approx(train(one), rel=1e-5)
    assert torch.allclose(logprobs(run), logprobs(one), atol=1e-5)

    # The traced custom loss: every rank's logprobs meet on rank 0 for the gradient.
    mine = service.create_custom_loss(weighted_nll, NLL_RANKS).result()
    theirs = reference.create_custom_loss(weighted_nll, NLL_RANKS).result()
    got = run.forward_backward_custom(FIVE, mine).result().loss_total
    expected = one.forward_backward_custom(FIVE, theirs).result().loss_total
    assert got == pytest.approx(expected, rel=1e-5)
    for client in (run, one):
        client.optim_step(AdamParams(learning_rate=1e-2))
    assert torch.allclose(logprobs(run), logprobs(one), atol=1e-5)

    sampler = run.save_weights_and_get_sampling_client()
    prompt, params = FIVE[0].model_input, SamplingParams(max_tokens=4)
    if fsdp:  # rank 0 alone cannot run a forward of a sharded base
        with pytest.raises(InvalidRequestError, match="fsdp"):
            sampler.sample(prompt, 1, params).result()
    else:
        assert len(sampler.sample(prompt, 2, params).result().sequences) == 2
    return run.save_state("layout").result().path, logprobs(run)


def resume(service, one, path: str, saved: torch.Tensor) -> None:
    """The checkpoint at `path` resumes on `service` (another layout) and trains on like `one`."""
    resumed = service.create_training_client_from_state_with_optimizer(path)
    assert torch.allclose(logprobs(resumed), saved, atol=1e-6)
    train(resumed, 2), train(one, 2)
    assert torch.allclose(logprobs(resumed), logprobs(one), atol=1e-5)


@pytest.mark.timeout(300)  # four server starts, three of them of two ranks
def test_ranks_train_like_one_process_and_resume_across_layouts(engine, tmp_path):
    """Three layout changes: two ranks -> one process, one process -> two ranks, two ranks
    with FSDP -> one process; chained through one data dir so that four server starts serve
    all three (each change has its own run and its own reference run in this process)."""
    reference = ServiceClient(transport=InProcessTransport(engine=engine))
    one = {change: reference.create_lora_training_client(TINY, rank=8, seed=11) for change in "abc"}
    with serving(tmp_path) as service:  # one process
        saved_b = train_and_save(service, reference, one["b"], fsdp=False)
    with serving(tmp_path, *TWO_RANKS) as service:
        resume(service, one["b"], *saved_b)
        saved_a = train_and_save(service, reference, one["a"], fsdp=False)
    with serving(tmp_path, *TWO_RANKS, "--fsdp") as service:
        saved_c = train_and_save(service, reference, one["c"], fsdp=True)
    with serving(tmp_path) as service:  # one process
        resume(service, one["a"], *saved_a)
        resume(service, one["c"], *saved_c)


@pytest.mark.timeout(300)
def test_two_ranks_page_runs_in_and_out_in_lock_step(engine, tmp_path):
    """`--nproc 2 --max-resident-runs 1`: two runs trained in turn are paged out and in
    on both ranks every step (each rank applies the same operations in the same order, so
    it makes the same paging choices: engine/paging.py), and train like the same runs in
    this process. A rank that paged otherwise would sum other gradients."""
    import httpx

    reference = ServiceClient(transport=InProcessTransport(engine=engine))
    ones = [reference.create_lora_training_client(TINY, rank=8, seed=s) for s in (3, 4)]
    server = ServerProcess(tmp_path, *TWO_RANKS, "--max-resident-runs", "1")
    service = ServiceClient(base_url=server.url, api_key=KEYS[0])
    try:
        runs = [service.create_lora_training_client(TINY, rank=8, seed=s) for s in (3, 4)]
        for _ in range(2):
            for run, one in zip(runs, ones):
                assert train(run, 1) == pytest.approx(train(one, 1), rel=1e-5)
        for run, one in zip(runs, ones):
            assert torch.allclose(logprobs(run), logprobs(one), atol=1e-5)
        paging = httpx.get(
            f"{server.url}/api/v1/dashboard/paging", headers={"X-API-Key": KEYS[0]}
        ).json()["bases"][TINY]
        service.close()
    finally:
        server.stop()
    assert paging["resident_runs"] == 1 and paging["page_ins"] >= 4
