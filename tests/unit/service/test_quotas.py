"""One API key cannot crowd out another: turns go by key, then by run; per-key quotas;
what the server holds is freed or pruned (sessions' losses and samplers, old results,
old metric rows). Service-level, on a fake clock, so nothing waits; the HTTP face of
the quotas (403 / 429 through the official SDK) is at the end."""

from __future__ import annotations

import contextlib
import threading

import pytest
import tinker
from helpers import (
    KEYS,
    NLL_RANKS,
    ROOT,
    TINY,
    ServerProcess,
    caller,
    create_run,
    loss,
    make_datum,
    sdk_loss_request,
    weighted_nll,
)

from tinkerd.errors import NotFoundError, QueueFullError, QuotaExceededError
from tinkerd.requests import (
    CreateCustomLossRequest,
    CreateSamplingSessionRequest,
    UnloadModelRequest,
)
from tinkerd.service import Service, ServiceConfig
from tinkerd.service.scheduler import Scheduler
from tinkerd.service.store import Store
from tinkerd.types import LoraConfig

LORA = LoraConfig(rank=2, seed=5)
FB = [make_datum([256, 7, 8, 9])]


def open_sampling(session: str, seq: int) -> CreateSamplingSessionRequest:
    return CreateSamplingSessionRequest(
        session_id=session, sampling_session_seq_id=seq, base_model=TINY
    )


def upload(session: str, graph: dict, seq: int) -> CreateCustomLossRequest:
    return CreateCustomLossRequest(session_id=session, graph=graph | {"custom_loss_seq_id": seq})


def service_with(engine, tmp_path, **limits) -> Service:
    config = ServiceConfig(expiry_interval=0, **limits)
    return Service(engine, tmp_path, [TINY], config)


@contextlib.contextmanager
def lane_held(scheduler: Scheduler, lane: str = TINY):
    """Hold the lane while the body queues work; always let go (a failing assertion must
    not leave a lane blocked, which would hang the interpreter's exit)."""
    gate = threading.Event()
    scheduler.submit_keyed(lane, "gate", gate.wait)
    try:
        yield
    finally:
        gate.set()


def test_scheduler_turns_go_by_tenant_then_by_key():
    """Tenant A's three keys get one turn per round, like tenant B's one key."""
    scheduler = Scheduler()
    order: list[str] = []
    with lane_held(scheduler, "lane"):
        for _ in range(2):
            for key in ("a1", "a2", "a3"):
                scheduler.submit_keyed("lane", key, lambda k=key: order.append(k), tenant="A")
            scheduler.submit_keyed("lane", "b", lambda: order.append("b"), tenant="B")
    scheduler.shutdown()
    assert order == ["a1", "b", "a2", "b", "a3", "a1", "a2", "a3"]


def test_a_key_with_many_runs_does_not_crowd_out_a_key_with_one(engine, tmp_path):
    """Alice queues one forward_backward on each of her 5 runs, then Bob one: Bob's is the
    second pass, not the sixth (turns per run would serve all of Alice's first)."""
    service = service_with(engine, tmp_path, max_pass_tokens=1)  # no packing
    alice, bob = (service.sessions.create(who, [], {}) for who in ("alice", "bob"))
    runs = [create_run(service, "alice", TINY, LORA, alice, i) for i in range(5)]
    victim = create_run(service, "bob", TINY, LORA, bob, 0)
    finished: list[str] = []
    with lane_held(service.scheduler):
        futures = [loss(service, "alice", m, FB, "cross_entropy") for m in runs]
        futures.append(loss(service, "bob", victim, FB, "cross_entropy"))
        for model_id, future in zip([*runs, victim], futures):
            future.add_done_callback(lambda _, m=model_id: finished.append(m))
    for future in futures:
        future.result()
    assert finished.index(victim) == 1, finished
    service.close()


def test_per_key_quotas_refuse_with_the_limit_named(engine, tmp_path):
    service = service_with(engine, tmp_path, max_runs_per_key=2, max_sessions_per_key=2)
    first = service.sessions.create("alice", [], {})
    service.sessions.create("alice", [], {})
    with pytest.raises(QuotaExceededError, match="max-sessions-per-key"):
        service.sessions.create("alice", [], {})
    other = service.sessions.create("bob", [], {})  # another key is not affected
    runs = [create_run(service, "alice", TINY, LORA, first, i) for i in range(2)]
    with pytest.raises(QuotaExceededError, match="max-runs-per-key") as refused:
        create_run(service, "alice", TINY, LORA, first, 2)
    assert refused.value.status_code == 403
    create_run(service, "bob", TINY, LORA, other, 0)
    unload = UnloadModelRequest(model_id=runs[0])
    service.submit(caller("alice"), unload).result()  # an unloaded run no longer counts
    create_run(service, "alice", TINY, LORA, first, 3)
    service.sessions.finish(first, "alice")  # nor does a finished session
    service.sessions.create("alice", [], {})
    service.close()


def test_queued_requests_per_key_answer_429_and_leave_other_keys_alone(engine, tmp_path):
    service = service_with(engine, tmp_path, max_queued_per_key=2, max_pass_tokens=1)
    alice, bob = (service.sessions.create(who, [], {}) for who in ("alice", "bob"))
    mine = create_run(service, "alice", TINY, LORA, alice, 0)
    theirs = create_run(service, "bob", TINY, LORA, bob, 0)
    with lane_held(service.scheduler):
        queued = [
            loss(service, "alice", mine, FB, "cross_entropy", forward_only=True) for _ in range(2)
        ]
        with pytest.raises(QueueFullError, match="max-queued-per-key") as refused:
            loss(service, "alice", mine, FB, "cross_entropy", forward_only=True)
        assert refused.value.status_code == 429 and refused.value.retry_after > 0
        weights = service.sampling.weights("alice", TINY, None)
        with pytest.raises(QueueFullError):  # samples count too
            service.sampling.sample(
                weights, [256, 5], 1, tinker.SamplingParams(max_tokens=1), owner="alice"
            )
        other = loss(service, "bob", theirs, FB, "cross_entropy", forward_only=True)
    for future in [*queued, other]:
        future.result()
    loss(service, "alice", mine, FB, "cross_entropy", forward_only=True).result()  # room again
    service.close()


def test_sampling_sessions_over_the_quota_drop_the_least_recently_used(engine, tmp_path):
    service = service_with(engine, tmp_path, max_sampling_sessions_per_key=2)
    session = service.sessions.create("alice", [], {})
    ids = [
        service.submit(caller("alice"), open_sampling(session, i)).result().sampling_session_id
        for i in range(3)
    ]
    with pytest.raises(NotFoundError, match="max-sampling-sessions-per-key"):
        service.sessions.sampler(ids[0], "alice")
    assert service.sessions.sampler(ids[2], "alice").base_model == TINY
    assert len(service.sessions.sampling) == 2
    service.sessions.finish(session, "alice")  # they go with their session
    assert not service.sessions.sampling
    service.close()


def test_uploaded_losses_go_with_their_session_and_have_a_quota(engine, tmp_path):
    graph = sdk_loss_request(weighted_nll, NLL_RANKS)
    size = len(__import__("json").dumps(graph))
    service = service_with(engine, tmp_path, max_losses_per_key=2, max_loss_bytes_per_key=3 * size)
    session = service.sessions.create("alice", [], {})
    for i in range(2):
        service.submit(caller("alice"), upload(session, graph, i))
    with pytest.raises(QuotaExceededError, match="max-losses-per-key"):
        service.submit(caller("alice"), upload(session, graph, 2))
    service.sessions.finish(session, "alice")
    assert not service.losses._compiled  # freed with the session
    small = service_with(engine, tmp_path / "b", max_loss_bytes_per_key=size // 2)
    with pytest.raises(QuotaExceededError, match="max-loss-bytes-per-key"):
        small.submit(caller("alice"), upload(small.sessions.create("alice", [], {}), graph, 0))
    service.close()
    small.close()


def test_finished_results_are_pruned_after_retrieval_and_retention(tmp_path):
    now = [1000.0]
    store = Store(tmp_path, clock=lambda: now[0])
    for rid in ("fetched", "never", "running"):
        store.add_future(rid, "alice", None, "forward")
    store.finish_future("fetched", "done", "application/json", b"{}")
    store.finish_future("never", "done", "application/json", b"{}")
    store.mark_retrieved("fetched")
    now[0] += 61
    assert store.prune_futures(retention=3600, grace=60) == 1
    assert store.future("fetched") is None and store.future("never") is not None
    now[0] += 3600
    assert store.prune_futures(retention=3600, grace=60) == 1
    assert store.future("never") is None
    assert store.future("running").status == "pending"  # never while in flight


def test_metric_rows_are_capped_by_thinning_old_steps(tmp_path):
    store = Store(tmp_path, max_metric_steps=100)
    for step in range(1, 1025):
        store.add_metrics("run", step, "forward_backward", {"loss": float(step)})
        store.add_metrics("run", step, "optim_step", {"grad_norm": 1.0})
        if step % 64 == 0:  # thinned after every 64th optim_step
            assert len({row[0] for row in store.metric_rows("run")}) <= 100
    steps = sorted({row[0] for row in store.metric_rows("run")})
    assert steps[-50:] == list(range(975, 1025))  # the recent steps stay exact
    assert steps[0] == 1 and len(steps) > 50  # older history kept, coarser


def test_quotas_reach_the_official_sdk_as_errors_naming_the_limit(tmp_path):
    server = ServerProcess(tmp_path, "--max-runs-per-key", "1")
    try:
        client = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
        client.create_lora_training_client(base_model=TINY, rank=2).result()
        with pytest.raises(tinker.APIStatusError, match="max-runs-per-key") as refused:
            client.create_lora_training_client(base_model=TINY, rank=2).result()
        assert refused.value.status_code == 403
        other = tinker.ServiceClient(base_url=server.url, api_key=KEYS[1])
        other.create_lora_training_client(base_model=TINY, rank=2).result()  # bob: unaffected
    finally:
        server.stop()


IDLE_TRIM = """
import ctypes, sys, time
sys.path.insert(0, "tests")
from helpers import TINY, make_datum
from helpers import create_run, loss
from tinkerd.engine import Engine
from tinkerd.requests import OptimStepRequest
from tinkerd.service import LOCAL, Service
from tinkerd.types import AdamParams, LoraConfig

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

service = Service.for_engine(Engine())
data = [make_datum([256, *b"some text to train on " * 8])] * 8
for seed in range(2):
    run = create_run(service, None, TINY, LoraConfig(rank=8, seed=seed))
    loss(service, None, run, data, "cross_entropy").result()
    step = OptimStepRequest(model_id=run, adam_params=AdamParams(learning_rate=1e-3))
    service.submit(LOCAL, step).result()
time.sleep(3)  # the lane is idle: its hook has trimmed (at most 2 s after the last)
before = rss()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(before - rss())
"""


def test_an_idle_lane_gives_freed_heap_back_to_the_os():
    """After training, once the lane is idle, the heap's freed pages are already back
    with the OS: a forced malloc_trim finds (almost) nothing left to return. (Without
    the idle trim it returns ~200 MiB on tinkerd/tiny: glibc keeps a pass's pages.)"""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", IDLE_TRIM], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) < 20.0  # MiB a forced trim still found
