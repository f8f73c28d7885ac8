"""Backpressure, session expiry, crashes mid-request, and secrets kept out of logs."""

import threading
import time

import pytest
import tinker
from helpers import (
    KEYS,
    TINY,
    ServerProcess,
    fwd_bwd_body,
    post,
    raw_model,
    raw_session,
    retrieve,
    sdk_datum,
)
from tinker import types


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """One server for the tests here that need no flags of their own (one process start
    instead of three): a queue of 2, a batch limit of 256 tokens, and debug logging."""
    server = ServerProcess(
        tmp_path_factory.mktemp("reliability"),
        *("--max-queue", "2", "--max-batch-tokens", "256", "--log-level", "debug"),
    )
    yield server
    server.stop()


@pytest.fixture
def limited(started):
    """The module's server, started again if an earlier test stopped it."""
    if started.proc.poll() is not None:
        started.start()
    return started


def test_a_full_queue_answers_429_and_the_sdk_retries_through_it(limited):
    server = limited
    model_id = raw_model(server)
    # seqs 2 and 3 wait for seq 1: the queue (2) is full.
    waiting = [post(server, "forward_backward", content=fwd_bwd_body(model_id, s)) for s in (2, 3)]
    assert all(r.status_code == 200 for r in waiting)
    refused = post(server, "forward_backward", content=fwd_bwd_body(model_id, 4))
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert "queued" in refused.json()["detail"]
    # The request the queue waits for is never refused (else: deadlock), and once it
    # runs everything drains; the refused seq 4 is then accepted as it was.
    first = post(server, "forward_backward", content=fwd_bwd_body(model_id, 1))
    assert first.status_code == 200
    for response in [first, *waiting]:
        assert "loss:sum" in str(retrieve(server, response.json()["request_id"]).content)
    again = post(server, "forward_backward", content=fwd_bwd_body(model_id, 4))
    assert again.status_code == 200

    # The official SDK pipelines 12 requests into a queue of 2: its retries cope, and
    # the results are the same as on an unbounded server.
    sdk = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
    client = sdk.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    data = [sdk_datum(b"backpressure")]
    futures = []
    for _ in range(6):
        futures.append(client.forward_backward(data, "cross_entropy"))
        futures.append(client.optim_step(types.AdamParams(learning_rate=1e-2)))
    losses = [f.result().metrics["loss:sum"] for f in futures[::2]]
    assert all(f.result().metrics["optim/step"] > 0 for f in futures[1::2])
    assert losses[-1] < losses[0]
    # The configured batch limit: 3 data x 120 tokens > 256 is refused, clearly.
    with pytest.raises(tinker.BadRequestError, match="server's limit of 256"):
        client.forward_backward([sdk_datum(b"x" * 120)] * 3, "cross_entropy").result()
    sdk.close("success").result()


def test_a_silent_session_expires_and_frees_its_runs_without_touching_others(tmp_path):
    server = ServerProcess(tmp_path, "--session-timeout", "2")
    try:
        silent_session, live_session = raw_session(server), raw_session(server)
        beating = {silent_session, live_session}  # both beat until their runs exist
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(0.3):
                for session in list(beating):
                    post(server, "session_heartbeat", json={"session_id": session})

        threading.Thread(target=beat, daemon=True).start()
        silent = raw_model(server, session=silent_session)
        live = raw_model(server, session=live_session)
        beating.discard(silent_session)  # from now on, one client is silent
        try:
            deadline = time.time() + 30
            while time.time() < deadline:
                if post(server, "get_info", json={"model_id": silent}).status_code != 200:
                    break
                time.sleep(0.25)
            # The silent session's run is unloaded; its heartbeat now says "gone".
            gone = post(server, "get_info", json={"model_id": silent})
            assert gone.status_code == 409 and "unloaded" in gone.json()["detail"]
            beat_again = post(server, "session_heartbeat", json={"session_id": silent_session})
            assert beat_again.status_code == 410
            # The live session's run still trains.
            done = post(server, "forward_backward", content=fwd_bwd_body(live, 1))
            assert "loss:sum" in str(retrieve(server, done.json()["request_id"]).content)
            assert post(server, "get_info", json={"model_id": live}).status_code == 200
            # A session that ends (the SDK's close) frees its runs at once.
            post(server, f"sessions/{live_session}/finish", json={})
            assert post(server, "get_info", json={"model_id": live}).status_code == 409
        finally:
            stop.set()
    finally:
        server.stop()


def test_requests_in_flight_at_a_crash_fail_clearly_after_restart(limited):
    server = limited
    model_id = raw_model(server)
    # seq 2 waits for seq 1, which never comes: it is in flight when the server dies.
    in_flight = post(server, "forward_backward", content=fwd_bwd_body(model_id, 2))
    request_id = in_flight.json()["request_id"]
    server.stop(kill=True)
    server.start()
    failed = retrieve(server, request_id)
    assert failed.status_code == 200
    body = failed.json()
    assert body["category"] == "server" and "restarted" in body["error"]
    # The run itself did not survive (only checkpoints do), and says so.
    assert post(server, "get_info", json={"model_id": model_id}).status_code == 404


def test_after_a_restart_a_runs_old_client_is_told_to_reload_its_last_checkpoint(tmp_path):
    """The run is listed after a restart but its weights were in memory only: the old
    official-SDK client's next request gets a 404 that says so and what to do, and doing
    it (a new client from the last checkpoint, with its optimizer) trains on."""
    server = ServerProcess(tmp_path)
    try:
        sdk = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
        client = sdk.create_lora_training_client(base_model=TINY, rank=2).result()
        batch = [sdk_datum(b"abc")]
        client.forward_backward(batch, "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        path = client.save_state("last").result().path
        server.stop(kill=True)
        server.start()
        with pytest.raises(tinker.NotFoundError) as lost:
            client.forward_backward(batch, "cross_entropy").result()
        message = str(lost.value)
        assert "restarted" in message and "create_training_client_from_state" in message
        fresh = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
        rest = tinker.RestClient(base_url=server.url, api_key=KEYS[0])
        runs = rest.list_training_runs().result().training_runs
        assert client.model_id in [r.training_run_id for r in runs]  # still listed
        resumed = fresh.create_training_client_from_state_with_optimizer(path).result()
        assert resumed.forward_backward(batch, "cross_entropy").result().metrics
    finally:
        server.stop()


def test_api_keys_never_reach_the_logs(limited):
    server = limited  # logs at debug level; its log also holds the tests above
    try:
        model_id = raw_model(server)
        post(server, "get_info", key=KEYS[1], json={"model_id": model_id})  # a 404
        post(server, "create_session", key="tml-not-a-key", json={})  # a 401
        raw_session(server, key=KEYS[1])
    finally:
        server.stop()
    log = server.output()
    assert "POST /api/v1/create_session" in log  # the log is there...
    for secret in (*KEYS, "tml-not-a-key"):
        assert secret not in log  # ...and holds no key
