"""Operating a server (docs/operations.md): /metrics scraped and parsed with
prometheus_client's parser after real training and sampling through the official SDK, the
SDK's export_session_trace (a Chrome JSON trace, checked against the Trace Event Format),
key scoping of trace links, one JSON log line per request with its id in X-Request-ID, the
dashboard's server view, and a real Prometheus server scraping `tinkerd serve`."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import httpx
import pytest
import tinker
from helpers import KEYS, ROOT, TINY, ServerProcess, free_port, sdk_datum
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from tinker import types

from tinkerd.server.app import Server, create_app, fingerprint

STEPS, SAMPLES, SAMPLED = 3, 2, 4  # training steps, sample requests, tokens per sample
INSTALLER = ROOT / "scripts" / "install-prometheus.sh"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("ops"), "--log-requests")
    yield proc
    proc.stop()


def scrape(server, key: str = KEYS[0]) -> dict[tuple[str, tuple], float]:
    """The server's /metrics, parsed."""
    answer = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return parse(answer.text)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of Prometheus' text format."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def train_and_sample(server, key: str) -> dict:
    """A short session through the official SDK: STEPS forward_backward + optim_step,
    sampler weights, SAMPLES samples. What it sent, and its session id."""
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    client = service.create_lora_training_client(base_model=TINY, rank=4).result()
    data = [sdk_datum(b"hello world"), sdk_datum(b"abc")]
    for _ in range(STEPS):
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    sampler = client.save_weights_and_get_sampling_client(name="ops").result()
    params = types.SamplingParams(max_tokens=SAMPLED, temperature=1.0)
    prompt = types.ModelInput.from_ints([256, *b"hi"])
    sampled = 0  # at most SAMPLED each: a sample may stop at EOS
    for _ in range(SAMPLES):
        sampled += len(sampler.sample(prompt, 1, params).result().sequences[0].tokens)
    return {
        "session": client.model_id.split(":train:")[0],
        "model_id": client.model_id,
        "tokens": STEPS * sum(d.model_input.length for d in data),
        "sampled": sampled,
        "requests": 1 + 2 * STEPS + 1 + SAMPLES,  # create, steps, save, samples
    }


@pytest.fixture(scope="module")
def session(server):
    """Alice's session, with /metrics scraped before and after it."""
    before = scrape(server)
    sent = train_and_sample(server, KEYS[0])
    return sent | {"before": before, "after": scrape(server)}


def test_metrics_count_what_was_sent(server, session):
    before, after = session["before"], session["after"]
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    ok = {"outcome": "ok"}
    assert delta("tinkerd_requests_total", verb="forward_backward", **ok) == STEPS
    assert delta("tinkerd_requests_total", verb="optim_step", **ok) == STEPS
    assert delta("tinkerd_requests_total", verb="create_model", **ok) == 1
    assert delta("tinkerd_requests_total", verb="sample", **ok) == SAMPLES
    assert delta("tinkerd_request_tokens_total", verb="forward_backward") == session["tokens"]
    assert delta("tinkerd_request_latency_seconds_count", verb="optim_step") == STEPS
    # Training passes: every forward_backward's tokens went through a lane (unpadded here:
    # each pass holds one run's batch, padded to its longest datum).
    assert delta("tinkerd_pass_tokens_total", lane=TINY) >= session["tokens"]
    assert delta("tinkerd_lane_busy_seconds_total", lane=TINY) > 0
    assert delta("tinkerd_pass_runs_count", lane=TINY) >= 2 * STEPS
    # Sampling: every sampled token chosen by a decode step, each prompt prefilled.
    assert delta("tinkerd_sampler_decode_tokens_total", lane=TINY) == session["sampled"] > 0
    assert delta("tinkerd_sampler_prefill_tokens_total", lane=TINY) == SAMPLES * 3
    assert delta("tinkerd_time_to_first_token_seconds_count", lane=TINY) == SAMPLES
    assert ("tinkerd_queue_depth", (("kind", "train"), ("lane", TINY))) in after
    assert value(after, "tinkerd_queue_depth", kind="sample", lane=TINY) == 0
    assert value(after, "tinkerd_runs_loaded") >= 1
    assert value(after, "process_resident_memory_bytes") > 10e6
    # per-key series are the operator's (--metrics-key): a tenant's key never sees them
    assert not [name for (name, _) in after if name.startswith("tinkerd_key_requests")]


def test_metrics_need_a_key(server, session):
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    wrong = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer tml-wrong"})
    assert wrong.status_code == 401


def test_a_metrics_key_replaces_the_api_keys(engine, tmp_path):
    app = create_app(Server(engine, tmp_path, list(KEYS), [TINY], metrics_keys=["scrape-it"]))
    client = TestClient(app, headers={"X-API-Key": KEYS[1]})
    assert client.get("/metrics").status_code == 401  # a tenant's key no longer scrapes
    session = client.post("/api/v1/create_session", json={}).json()["session_id"]
    body = {
        "session_id": session,
        "model_seq_id": 0,
        "base_model": TINY,
        "lora_config": {"rank": 4},
    }
    assert client.post("/api/v1/create_model", json=body).status_code == 200
    operator = {"Authorization": "Bearer scrape-it"}
    key = fingerprint(KEYS[1])
    deadline, seen = time.time() + 60, 0.0
    while not seen and time.time() < deadline:  # counted once the run exists
        metrics = parse(client.get("/metrics", headers=operator).text)
        seen = value(metrics, "tinkerd_key_requests_total", key=key, verb="create_model")
    assert seen == 1  # the operator sees each key's requests
    client.post(f"/api/v1/sessions/{session}/finish", json={})


def check_trace_event_format(trace: dict) -> list[dict]:
    """Validate a JSON trace against the Trace Event Format (the subset ui.perfetto.dev's
    JSON importer reads: https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU);
    returns its events."""
    assert set(trace) <= {"traceEvents", "displayTimeUnit", "otherData"}
    assert trace["displayTimeUnit"] in ("ms", "ns")
    events = trace["traceEvents"]
    assert isinstance(events, list) and events
    json.dumps(trace, allow_nan=False)  # strict JSON: no NaN or Infinity
    open_async: dict[tuple, int] = {}
    for e in events:
        assert e["ph"] in {"X", "b", "e", "C", "M"}, e
        assert isinstance(e["name"], str) and e["name"]
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name") and isinstance(
                e["args"]["name"], str
            )
            continue
        assert isinstance(e["ts"], int | float) and e["ts"] >= 0, e
        if e["ph"] == "X":
            assert isinstance(e["dur"], int | float) and e["dur"] >= 0
        if e["ph"] in "be":
            assert isinstance(e["cat"], str) and isinstance(e["id"], str)
            key = (e["cat"], e["id"], e["name"])
            open_async[key] = open_async.get(key, 0) + (1 if e["ph"] == "b" else -1)
            assert open_async[key] >= 0, f"'e' before its 'b': {e}"
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, int | float) for v in e["args"].values())
    assert not any(open_async.values()), "an async slice was never closed"
    # complete slices on one thread must nest (they never overlap partly)
    by_thread: dict[tuple, list] = {}
    for e in events:
        if e["ph"] == "X":
            by_thread.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for slices in by_thread.values():
        slices.sort()
        for (_, end), (start, _) in zip(slices, slices[1:]):
            assert start >= end - 1e-3, "overlapping slices on one thread"
    return events


def request_spans(events: list[dict]) -> dict[str, str]:
    """{request_id: verb} of the trace's per-request async slices."""
    return {e["id"]: e["name"] for e in events if e["ph"] == "b" and e["name"] != "queued"}


def log_lines(server) -> list[dict]:
    lines = []
    for text in server.output().splitlines():
        if text.startswith('{"ts"'):
            lines.append(json.loads(text))
    return lines


def session_lines(server, session: dict) -> list[dict]:
    """The log lines of `session`, once all its requests' lines were read from the
    server's output (a thread drains it: the last may lag a moment)."""
    deadline = time.time() + 10
    while True:
        mine = [line for line in log_lines(server) if line.get("session") == session["session"]]
        if len(mine) >= session["requests"] or time.time() > deadline:
            return mine
        time.sleep(0.1)


def test_sdk_exports_a_session_trace_with_one_span_per_request(server, session):
    rest = tinker.RestClient(base_url=server.url, api_key=KEYS[0])
    url = rest.export_session_trace(session["session"]).result()
    trace = httpx.get(url)  # no key: the signed link is the permission
    assert trace.status_code == 200
    events = check_trace_event_format(trace.json())
    spans = request_spans(events)
    logged = {line["request_id"]: line["verb"] for line in session_lines(server, session)}
    assert len(spans) == session["requests"] and spans == logged
    verbs = sorted(spans.values())
    assert verbs.count("forward_backward") == STEPS and verbs.count("sample") == SAMPLES
    running = [e for e in events if e["ph"] == "X" and e["name"] == "forward_backward"]
    assert len(running) == STEPS and all(e["args"]["tokens"] > 0 for e in running)
    assert all("packed_with" in e["args"] for e in running)
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"in flight", "tokens/s", "request tokens"} <= counters


def test_trace_links_are_key_scoped(server, session):
    bob = train_and_sample(server, KEYS[1])
    alice_rest = tinker.RestClient(base_url=server.url, api_key=KEYS[0])
    alice_url = alice_rest.export_session_trace(session["session"]).result()
    # Bob cannot export Alice's session: it looks absent.
    answer = httpx.get(
        f"{server.url}/api/v1/sessions/{session['session']}/trace_export",
        headers={"X-API-Key": KEYS[1]},
    )
    assert answer.status_code == 404
    # Bob's own trace holds none of Alice's requests.
    bob_url = tinker.RestClient(base_url=server.url, api_key=KEYS[1]).export_session_trace(
        bob["session"]
    )
    bob_spans = request_spans(check_trace_event_format(httpx.get(bob_url.result()).json()))
    alice_spans = request_spans(check_trace_event_format(httpx.get(alice_url).json()))
    assert len(bob_spans) == bob["requests"] and not set(bob_spans) & set(alice_spans)
    # Alice's signature does not open Bob's session, nor a changed expiry.
    forged = alice_url.replace(session["session"], bob["session"])
    assert httpx.get(forged).status_code == 404
    expires = int(alice_url.split("expires=")[1].split("&")[0])
    assert (
        httpx.get(alice_url.replace(f"expires={expires}", f"expires={expires + 1}")).status_code
        == 404
    )


def test_one_json_log_line_per_request_and_its_id_in_a_header(server, session):
    mine = session_lines(server, session)
    assert len(mine) == session["requests"]
    for line in mine:
        assert set(line) >= {"request_id", "key", "session", "run", "verb", "tokens"}
        assert line["outcome"] == "ok" and line["queue_s"] >= 0 and line["run_s"] >= 0
        assert line["key"].startswith("key-")
    fb = [line for line in mine if line["verb"] == "forward_backward"]
    assert sum(line["tokens"] for line in fb) == session["tokens"]
    assert {line["run"] for line in fb} == {session["model_id"]}
    # The header carries the request_id the answer (and the log) uses.
    headers = {"X-API-Key": KEYS[0]}
    answer = httpx.post(
        f"{server.url}/api/v1/save_weights",
        json={"model_id": session["model_id"], "path": "ops-header"},
        headers=headers,
    )
    request_id = answer.json()["request_id"]
    assert answer.headers["x-request-id"] == request_id
    # A request refused before it was queued gets a line too, under its header's id.
    refused = httpx.post(
        f"{server.url}/api/v1/optim_step",
        json={"model_id": "session-nope:train:0", "adam_params": {"learning_rate": 0.1}},
        headers=headers,
    )
    assert refused.status_code == 404
    deadline = time.time() + 10
    while time.time() < deadline:
        lines = {line["request_id"]: line for line in log_lines(server)}
        if request_id in lines and refused.headers["x-request-id"] in lines:
            break
        time.sleep(0.1)
    assert lines[request_id]["verb"] == "save_weights" and lines[request_id]["outcome"] == "ok"
    line = lines[refused.headers["x-request-id"]]
    assert (line["verb"], line["outcome"], line["status"]) == ("optim_step", "rejected", 404)
    assert (
        value(scrape(server), "tinkerd_requests_total", verb="optim_step", outcome="rejected") >= 1
    )


def test_dashboard_server_view_route(server, session):
    answer = httpx.get(f"{server.url}/api/v1/dashboard/server", headers={"X-API-Key": KEYS[0]})
    assert answer.status_code == 200 and answer.json()["interval_s"] > 0
    assert httpx.get(f"{server.url}/api/v1/dashboard/server").status_code == 401


def find_prometheus() -> str | None:
    found = shutil.which("prometheus")
    if found:
        return found
    done = subprocess.run(["sh", str(INSTALLER)], capture_output=True, text=True, timeout=600)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 else None


def test_a_real_prometheus_scrapes_training(server, tmp_path):
    binary = find_prometheus()
    if binary is None:
        pytest.skip("Debian's prometheus package could not be installed (needs root and apt)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: tinkerd\n"
        f"    authorization: {{credentials: {KEYS[0]}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop = threading.Event()

    def train() -> None:
        service = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
        client = service.create_lora_training_client(base_model=TINY, rank=4).result()
        while not stop.is_set():
            client.forward_backward([sdk_datum(b"prometheus scrapes")], "cross_entropy").result()
            client.optim_step(types.AdamParams(learning_rate=1e-3)).result()

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    query = lambda q: httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}).json()  # noqa: E731
    try:
        rate, depth = [], []
        deadline = time.time() + 90
        while time.time() < deadline and not (rate and depth):
            time.sleep(1)
            try:
                rate = query("rate(tinkerd_pass_tokens_total[10s]) > 0")["data"]["result"]
                depth = query('tinkerd_queue_depth{kind="train"}')["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                continue  # Prometheus still starting
        assert rate and float(rate[0]["value"][1]) > 0, "no training-token rate in Prometheus"
        assert depth and depth[0]["metric"]["lane"] == TINY
    finally:
        stop.set()
        trainer.join(timeout=60)
        prometheus.terminate()
        prometheus.wait(timeout=30)
