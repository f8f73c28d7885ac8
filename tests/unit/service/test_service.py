"""The service layer: one Service per engine shared by embedded clients; sessions expire
on the service's clock; the client package imports no server, service or engine code."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from helpers import TINY, create_run, make_datum

from tinkerd import ServiceClient
from tinkerd.client.transport import InProcessTransport
from tinkerd.errors import ModelUnloadedError
from tinkerd.service import Service, ServiceConfig
from tinkerd.types import LoraConfig


def test_two_embedded_service_clients_on_one_engine_share_a_pass(engine):
    """Runs of two separate embedded ServiceClients are scheduled by one service: their
    concurrent forward_backwards go through one packed pass."""
    first = ServiceClient(transport=InProcessTransport(engine=engine))
    second = ServiceClient(transport=InProcessTransport(engine=engine))
    service = Service.for_engine(engine)
    assert first.transport.service is second.transport.service is service
    a = first.create_lora_training_client(TINY, rank=4, seed=1)
    b = second.create_lora_training_client(TINY, rank=4, seed=2)
    gate = threading.Event()  # hold the lane so both requests are queued together
    service.scheduler.submit_keyed(TINY, "gate", gate.wait)
    fa = a.forward_backward([make_datum([256, 5, 6, 7])], "cross_entropy")
    fb = b.forward_backward([make_datum([256, 8, 9])], "cross_entropy")
    gate.set()
    assert fa.result().metrics["loss:sum"] > 0 and fb.result().metrics["loss:sum"] > 0
    assert (a.model_id, b.model_id) in service.scheduler.passes
    for client in (a, b):
        client.unload_model().result()
    first.close()
    second.close()


def test_a_silent_session_expires_on_the_service_clock(engine, tmp_path):
    """No real waiting: the clock is injected and the sweep is called by hand."""
    now = [1000.0]
    config = ServiceConfig(session_timeout=10.0, expiry_interval=0, clock=lambda: now[0])
    service = Service(engine, tmp_path, [TINY], config)
    silent = service.sessions.create("alice", [], {})
    alive = service.sessions.create("alice", [], {})
    lora = LoraConfig(rank=4, seed=3)
    gone = create_run(service, "alice", TINY, lora, silent, 0)
    kept = create_run(service, "alice", TINY, lora, alive, 0)
    now[0] += 9.0
    assert service.sessions.expire() == []
    assert service.sessions.heartbeat(alive, "alice")
    now[0] += 2.0  # the silent one: 11 s without a heartbeat; the other: 2 s
    assert service.sessions.expire() == [silent]
    with pytest.raises(ModelUnloadedError):
        engine.run(gone)
    assert engine.run(kept).base.name == TINY
    assert not service.sessions.heartbeat(silent, "alice")  # ended for good
    service.sessions.finish(alive, "alice")
    with pytest.raises(ModelUnloadedError):
        engine.run(kept)
    service.close()


def test_importing_tinkerd_imports_no_engine_server_service_or_torch():
    code = (
        "import sys, tinkerd\n"
        "print([m for m in sys.modules if m in ('torch', 'fastapi') or "
        "m.startswith(('tinkerd.engine', 'tinkerd.server', 'tinkerd.service'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_run_taken_back_after_a_restart_orders_its_requests_from_its_first_seq_id():
    """A restarted server's run goes on with its client's seq_ids (not from 1): the first
    one to come starts its order, later ones still wait their turn."""
    from concurrent.futures import Future

    from tinkerd.service.futures import RequestQueue

    queue = RequestQueue(scheduler=None, gap_timeout=3600)
    ran = []

    def work(n: int):
        def start() -> Future:
            ran.append(n)
            done: Future = Future()
            done.set_result(n)
            return done

        return start

    queue.submit(None, work(7), "fresh", 7)  # a new run's order starts at 1: this waits
    queue.resume("back")
    for seq_id in (8, 10, 9):
        queue.submit(None, work(seq_id), "back", seq_id)
    assert ran == [8, 9, 10]
