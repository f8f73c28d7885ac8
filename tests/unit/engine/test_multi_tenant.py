"""Many runs, one base: packed multi-LoRA training passes, and fair turn-taking.

(Sampling rows of several adapters in one batch: test_sampling.py,
test_concurrent_requests_share_a_batch_with_their_own_adapters.)
"""

import threading

import pytest
import torch
from helpers import TINY, make_datum

from tinkerd import ServiceClient
from tinkerd.client.transport import InProcessTransport
from tinkerd.errors import InvalidRequestError
from tinkerd.service import Service, ServiceConfig
from tinkerd.service.scheduler import Batchable, Scheduler
from tinkerd.types import AdamParams, Datum, LoraConfig, ModelInput

ADAM = AdamParams(learning_rate=3e-2)
CONFIGS = [  # different ranks and adapted modules share one pass
    LoraConfig(rank=4, seed=1),
    LoraConfig(rank=8, seed=2, train_mlp=False),
    LoraConfig(rank=2, seed=3, train_attn=False, train_unembed=True),
]


def run_data(k: int, step: int) -> list[Datum]:
    """Run k's batch at `step`: its own texts, lengths and row counts."""
    texts = [f"run {k} step {step} " + "xyz" * (k + 1), "ab" * (step + 2)][: 1 + (k + step) % 2]
    return [make_datum([256, *t.encode()]) for t in texts]


def adapter(engine, model_id):
    return {
        n.replace(model_id, "*"): p.detach().clone()
        for n, p in engine.run(model_id).adapter_state().items()
    }


UNIFORM = [LoraConfig(rank=4, seed=s) for s in (7, 8, 9)]


def same_rows(k: int, step: int) -> list[Datum]:
    return [make_datum([256, *f"{k} {step} {t}".encode()]) for t in ("ab", "uvwxyz")]


@pytest.mark.parametrize(
    "configs, data",
    [(CONFIGS, run_data), (UNIFORM, same_rows)],  # per-segment loop; batched matmul
    ids=["mixed", "uniform"],
)
def test_runs_trained_together_end_as_trained_alone(engine, configs, data):
    alone = [engine.create_model(TINY, c) for c in configs]
    together = [engine.create_model(TINY, c) for c in configs]
    for step in range(2):
        outs_alone = [
            engine.forward_backward(m, data(k, step), "cross_entropy") for k, m in enumerate(alone)
        ]
        requests = [
            engine.prepare(m, data(k, step), "cross_entropy", None) for k, m in enumerate(together)
        ]
        outs_together = engine.run_losses(requests, backward=True)
        for a, b in zip(outs_alone, outs_together):
            assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
            for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs):
                lp_a, lp_b = x["logprobs"].to_torch(), y["logprobs"].to_torch()
                assert torch.allclose(lp_a, lp_b, atol=1e-5)
        for m_alone, m_together in zip(alone, together):
            engine.optim_step(m_alone, ADAM)
            engine.optim_step(m_together, ADAM)
    for m_alone, m_together in zip(alone, together):
        a, b = adapter(engine, m_alone), adapter(engine, m_together)
        assert a.keys() == b.keys()
        assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in a.items() if "lora_B" in n)
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5), name
    for m in alone + together:
        engine.unload_model(m)


def test_a_failing_request_leaves_the_others_in_its_pass(engine):
    ids = [engine.create_model(TINY, LoraConfig(rank=4, seed=s)) for s in (5, 6)]
    solo = engine.create_model(TINY, LoraConfig(rank=4, seed=6))
    bad = Datum(
        model_input=ModelInput.from_ints([256, 1, 2]),
        loss_fn_inputs={
            "target_tokens": [1, 2, 3],
            "advantages": [1.0, 1.0, 1.0],
            "logprobs": [-1e30, 0.0, 0.0],  # the importance ratio overflows
        },
    )
    good = run_data(0, 0)
    requests = [
        engine.prepare(ids[0], [bad], "importance_sampling", None),
        engine.prepare(ids[1], good, "cross_entropy", None),
    ]
    gone = engine.create_model(TINY, LoraConfig(rank=4, seed=7))
    requests.append(engine.prepare(gone, good, "cross_entropy", None))
    engine.unload_model(gone)  # unloaded while "queued"
    results = engine.run_losses(requests, backward=True)
    assert isinstance(results[0], InvalidRequestError) and "no gradient" in str(results[0])
    assert "unloaded" in str(results[2])
    engine.forward_backward(solo, good, "cross_entropy")
    assert all(p.grad is None for p in engine.run(ids[0]).params)
    for p, q in zip(engine.run(ids[1]).params, engine.run(solo).params):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    for m in [*ids, solo]:
        engine.unload_model(m)


def gated(transport: InProcessTransport) -> threading.Event:
    """Hold the tiny model's lane until the returned event is set."""
    gate = threading.Event()
    transport.service.scheduler.submit_keyed(TINY, "gate", gate.wait)
    return gate


def test_queued_forward_backwards_of_several_runs_share_one_pass(engine):
    transport = InProcessTransport(engine=engine)
    service = ServiceClient(transport=transport)
    clients = [service.create_lora_training_client(TINY, rank=4, seed=10 + k) for k in range(4)]
    solo = [service.create_lora_training_client(TINY, rank=4, seed=10 + k) for k in range(4)]
    gate = gated(transport)
    futures = [c.forward_backward(run_data(k, 1), "cross_entropy") for k, c in enumerate(clients)]
    steps = [c.optim_step(ADAM) for c in clients]
    gate.set()
    outs = [f.result() for f in futures]
    [s.result() for s in steps]
    ids = tuple(c.model_id for c in clients)
    assert ids in transport.service.scheduler.passes  # one pass for the four runs' requests
    for k, (c, out) in enumerate(zip(solo, outs)):
        assert c.forward_backward(run_data(k, 1), "cross_entropy").result().metrics[
            "loss:sum"
        ] == pytest.approx(out.metrics["loss:sum"], rel=1e-5)
        c.optim_step(ADAM).result()
        a, b = adapter(engine, c.model_id), adapter(engine, clients[k].model_id)
        assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    service.close()


def test_a_huge_batch_does_not_starve_another_run(engine):
    """Run A queues four large forward_backwards, then run B one small one: B's finishes
    before A's second (turn-taking), where a FIFO queue would finish it last."""
    config = ServiceConfig(max_pass_tokens=64)  # A's batches never pack with anything
    transport = InProcessTransport(service=Service(engine, config=config, recover=False))
    service = ServiceClient(transport=transport)
    a = service.create_lora_training_client(TINY, rank=4, seed=20)
    b = service.create_lora_training_client(TINY, rank=4, seed=21)
    big = [make_datum([256, *b"a long sequence of bytes " * 3])] * 4
    finished: list[str] = []
    gate = gated(transport)
    for i in range(4):
        a.forward_backward(big, "cross_entropy")._future.add_done_callback(
            lambda _, i=i: finished.append(f"a{i}")
        )
    done = b.forward_backward([make_datum([256, 1, 2])], "cross_entropy")
    done._future.add_done_callback(lambda _: finished.append("b"))
    gate.set()
    a.optim_step(ADAM).result()
    done.result()
    assert finished.index("b") < finished.index("a1"), finished
    service.close()


def test_scheduler_turns_and_packing():
    """Keys take turns; Batchable heads of other keys join a pass up to the token limit;
    each key's own work stays in order."""
    scheduler = Scheduler(max_pass_tokens=10)
    gate = threading.Event()
    scheduler.submit_keyed("lane", "gate", gate.wait)
    log: list = []

    def run_many(payloads):
        log.append(tuple(payloads))
        return [ValueError(p) if p == "bad" else p.upper() for p in payloads]

    def item(name, tokens=4):
        return Batchable(group="g", tokens=tokens, payload=name, run_many=run_many)

    f = {
        "a1": scheduler.submit_keyed("lane", "a", item("a1")),
        "a2": scheduler.submit_keyed("lane", "a", item("a2")),
        "b1": scheduler.submit_keyed("lane", "b", item("b1")),
        "c1": scheduler.submit_keyed("lane", "c", lambda: log.append(("c1",)) or "C1"),
        "d1": scheduler.submit_keyed("lane", "d", item("bad")),
        "e1": scheduler.submit_keyed("lane", "e", item("e1", tokens=20)),
    }
    gate.set()
    assert f["a1"].result() == "A1" and f["e1"].result() == "E1"
    with pytest.raises(ValueError):
        f["d1"].result()
    scheduler.shutdown()
    # a1 packs b1 (8 tokens) but not bad (12 > 10); a goes to the back of the turns, so
    # then c1 (no Batchable) runs alone; bad packs a2 (e1 alone is over the limit); e1.
    assert log == [("a1", "b1"), ("c1",), ("bad", "a2"), ("e1",)]
