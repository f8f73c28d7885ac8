"""Tenant isolation on every route: Bob's key can neither see nor touch Alice's sessions,
runs, checkpoints, samplers or futures. The test fails if a route is added without a
probe here, so no endpoint escapes the check."""

import json
from collections.abc import Iterator

import pytest
from fastapi.routing import APIRoute
from helpers import KEYS, TINY, make_datum
from starlette.testclient import TestClient

from tinkerd import wire_proto
from tinkerd.server.app import Server, create_app, fingerprint

ALICE, BOB = KEYS


@pytest.fixture(scope="module")
def app(engine, tmp_path_factory):
    return create_app(Server(engine, tmp_path_factory.mktemp("iso"), list(KEYS), [TINY], 0.05))


def finished(client: TestClient, response) -> dict:
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    while True:
        result = client.post("/api/v1/retrieve_future", json={"request_id": request_id})
        if result.status_code != 408:
            return result.json() | {"request_id": request_id}


@pytest.fixture(scope="module")
def alice(app) -> dict[str, str]:
    """Alice's session, run, checkpoints, sampling session and a finished request."""
    client = TestClient(app, headers={"X-API-Key": ALICE})
    session = client.post("/api/v1/create_session", json={}).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": TINY}
    created = finished(
        client, client.post("/api/v1/create_model", json=body | {"lora_config": {"rank": 4}})
    )
    model = created["model_id"]
    save = {"model_id": model, "seq_id": 1, "path": "ckpt"}
    path = finished(client, client.post("/api/v1/save_weights", json=save))["path"]
    for_sampler = {"model_id": model, "seq_id": 2, "path": "s"}
    sampler_path = finished(
        client, client.post("/api/v1/save_weights_for_sampler", json=for_sampler)
    )["path"]
    opened = {"session_id": session, "sampling_session_seq_id": 0, "model_path": sampler_path}
    sampling = client.post("/api/v1/create_sampling_session", json=opened).json()
    return {
        "session": session,
        "model": model,
        "path": path,
        "sampler_path": sampler_path,
        "sampling": sampling["sampling_session_id"],
        "request": created["request_id"],
    }


def fwd_bwd(model_id: str) -> bytes:
    data = [make_datum([256, 1, 2, 3])]
    return wire_proto.encode_forward_backward_request(
        model_id, 3, data, "cross_entropy", None, False
    )


def probes(a: dict[str, str], bob_session: str) -> dict[tuple[str, str], dict]:
    """One request per route, made with Bob's key against Alice's things."""
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [256, 1]}]}
    checkpoint = {"model_id": a["model"], "kind": "weights", "name": "ckpt"}
    chat = {"messages": [{"role": "user", "content": "x"}]}
    return {
        ("POST", "/api/v1/session_heartbeat"): {"json": {"session_id": a["session"]}},
        ("POST", "/api/v1/sessions/{session_id}/finish"): {"path": {"session_id": a["session"]}},
        ("POST", "/api/v1/create_model"): {
            "json": {
                "session_id": a["session"],
                "model_seq_id": 9,
                "base_model": TINY,
                "lora_config": {"rank": 4},
            }
        },
        ("POST", "/api/v1/get_info"): {"json": {"model_id": a["model"]}},
        ("POST", "/api/v1/forward_backward"): {"content": fwd_bwd(a["model"])},
        ("POST", "/api/v1/forward"): {  # the JSON forward of older SDKs
            "json": {
                "model_id": a["model"],
                "seq_id": 3,
                "forward_input": {
                    "data": [make_datum([256, 1, 2]).model_dump()],
                    "loss_fn": "cross_entropy",
                },
            }
        },
        ("GET", "/api/v1/sessions/{session_id}"): {"path": {"session_id": a["session"]}},
        ("POST", "/api/v1/save_weights_external"): {
            "json": {"model_id": a["model"], "path": "theft"}
        },
        ("GET", f"{CHECKPOINT}/external_weights_urls"): {"path": checkpoint},
        ("GET", "/api/v1/models/{model_id}/checkpoints"): {"path": {"model_id": a["model"]}},
        ("POST", "/api/v1/create_custom_loss"): {"json": {"session_id": a["session"], "graph": {}}},
        ("POST", "/api/v1/optim_step"): {"json": {"model_id": a["model"], "seq_id": 3}},
        ("POST", "/api/v1/unload_model"): {"json": {"model_id": a["model"]}},
        ("POST", "/api/v1/save_weights"): {"json": {"model_id": a["model"], "path": "theft"}},
        ("POST", "/api/v1/load_weights"): {
            "json": {
                "session_id": bob_session,
                "model_seq_id": 0,
                "path": a["path"],
                "optimizer": True,
            }
        },
        ("POST", "/api/v1/weights_info"): {"json": {"tinker_path": a["path"]}},
        ("POST", "/api/v1/save_weights_for_sampler"): {
            "json": {"model_id": a["model"], "path": "x"}
        },
        ("POST", "/api/v1/create_sampling_session"): {
            "json": {"session_id": bob_session, "model_path": a["sampler_path"]}
        },
        ("GET", "/api/v1/samplers/{sampler_id}"): {"path": {"sampler_id": a["sampling"]}},
        ("POST", "/api/v1/asample"): {
            "json": {
                "sampling_session_id": a["sampling"],
                "prompt": prompt,
                "sampling_params": {"max_tokens": 2},
            }
        },
        ("POST", "/api/v1/retrieve_future"): {"json": {"request_id": a["request"]}},
        ("GET", "/api/v1/training_runs/{model_id}"): {"path": {"model_id": a["model"]}},
        ("GET", "/api/v1/training_runs/{model_id}/checkpoints"): {"path": {"model_id": a["model"]}},
        ("DELETE", CHECKPOINT): {"path": checkpoint},
        ("POST", f"{CHECKPOINT}/publish"): {"path": checkpoint},
        ("DELETE", f"{CHECKPOINT}/publish"): {"path": checkpoint},
        ("GET", f"{CHECKPOINT}/archive"): {"path": checkpoint},
        ("PUT", f"{CHECKPOINT}/ttl"): {"path": checkpoint, "json": {"ttl_seconds": 1}},
        ("GET", "/api/v1/dashboard/runs/{model_id}"): {"path": {"model_id": a["model"]}},
        ("GET", "/api/v1/dashboard/runs/{model_id}/metrics"): {"path": {"model_id": a["model"]}},
        ("GET", "/api/v1/sessions/{session_id}/trace_export"): {
            "path": {"session_id": a["session"]}
        },
        # the OpenAI- and Anthropic-compatible APIs, with Alice's checkpoint as the model
        ("POST", "/oai/api/v1/completions"): {
            "json": {"model": a["sampler_path"], "prompt": "x", "max_tokens": 1}
        },
        ("POST", "/oai/api/v1/chat/completions"): {"json": {"model": a["sampler_path"], **chat}},
        ("POST", "/anthropic/api/v1/messages"): {
            "json": {"model": a["sampler_path"], "max_tokens": 1, **chat}
        },
        ("POST", "/anthropic/api/v1/messages/count_tokens"): {
            "json": {"model": a["sampler_path"], **chat}
        },
    }


# Routes with nothing of anyone's to protect (listings are checked for leaks below).
OPEN = {
    ("GET", "/api/v1/healthz"),
    ("POST", "/api/v1/client/config"),
    ("POST", "/api/v1/client/dynamic_config"),
    ("GET", "/api/v1/get_server_capabilities"),
    ("POST", "/api/v1/create_session"),
    ("POST", "/api/v1/telemetry"),
    ("GET", "/api/v1/dashboard/paging"),  # server-wide counts per base model, no run ids
    ("GET", "/metrics"),  # server-wide totals; per-key series only for --metrics-key
    ("GET", "/api/v1/dashboard/server"),  # server-wide load, every key's together
}
LISTINGS = {
    ("GET", "/api/v1/sessions"),
    ("POST", "/api/v1/sessions/search"),
    ("GET", "/api/v1/training_runs"),
    ("GET", "/api/v1/checkpoints"),
    ("GET", "/api/v1/dashboard/runs"),
    ("GET", "/oai/api/v1/models"),
    ("GET", "/anthropic/api/v1/models"),
}
# The dashboard's page and its assets: the same for everyone, no key, nobody's data.
PAGES = {("GET", "/"), ("GET", "/static/{name}")}
CHECKPOINT = "/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}"
# Every other path under the compatible APIs: a 404 in that API's error shape, for anyone.
UNSERVED = {
    (method, f"{prefix}/{{path:path}}")
    for prefix in ("/oai/api/v1", "/anthropic/api")
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
}
# Needs no key: a signed, short-lived link is the permission (checked below).
SIGNED = {
    ("GET", "/api/v1/checkpoint_archives/{model_id}/{kind}/{name}"),
    ("GET", "/api/v1/external_weights_files/{model_id}/{name}/{filename}"),
    ("GET", "/api/v1/session_traces/{session_id}"),
}


def api_routes(routes: list) -> Iterator[APIRoute]:
    """Every APIRoute, those of included routers too (FastAPI wraps those; no prefixes)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)


def call(client: TestClient, method: str, path: str, probe: dict):
    url = path.format(**probe.get("path", {}))
    if "content" in probe:
        headers = {"Content-Type": "application/x-protobuf"}
        return client.request(method, url, content=probe["content"], headers=headers)
    return client.request(method, url, json=probe.get("json"))


def test_every_route_hides_one_keys_things_from_another(app, alice):
    bob = TestClient(app, headers={"X-API-Key": BOB})
    bob_session = bob.post("/api/v1/create_session", json={}).json()["session_id"]
    table = probes(alice, bob_session)
    routes = {(method, route.path) for route in api_routes(app.routes) for method in route.methods}
    expected = set(table) | OPEN | LISTINGS | PAGES | SIGNED | UNSERVED
    assert routes == expected, "a route without an isolation probe"

    for (method, path), probe in table.items():
        response = call(bob, method, path, probe)
        assert response.status_code == 404, (method, path, response.status_code, response.text)
        assert fingerprint(ALICE) not in response.text  # nor says whose it is
    for method, path in UNSERVED:
        assert bob.request(method, path.replace("{path:path}", "responses")).status_code == 404
    for method, path in LISTINGS:
        listed = bob.request(method, path).text
        assert alice["model"] not in listed and alice["path"] not in listed
    archive = "/api/v1/checkpoint_archives/{model_id}/weights/ckpt".format(model_id=alice["model"])
    files = "/api/v1/external_weights_files/{model_id}/x/adapter_config.json"
    for query in ("", "?expires=99999999999&signature=00", "?expires=1&signature=00"):
        assert bob.get(archive + query).status_code == 404  # no link, a forged or old one
        assert bob.get(files.format(model_id=alice["model"]) + query).status_code == 404
        assert bob.get(f"/api/v1/session_traces/{alice['session']}{query}").status_code == 404
    assert alice["session"] not in bob.get("/api/v1/sessions").text
    for owner in ("own", "accessible"):
        search = {"session_id": alice["session"], "owner": {"type": owner}}
        found = bob.post("/api/v1/sessions/search", json=search)
        assert found.status_code == 200 and found.json()["sessions"] == []

    # Everything of Alice's still works for Alice after Bob's attempts.
    mine = TestClient(app, headers={"X-API-Key": ALICE})
    assert mine.post("/api/v1/get_info", json={"model_id": alice["model"]}).status_code == 200
    assert (
        mine.post("/api/v1/session_heartbeat", json={"session_id": alice["session"]}).status_code
        == 200
    )
    info = mine.post("/api/v1/weights_info", json={"tinker_path": alice["path"]})
    assert info.status_code == 200 and info.json()["lora_rank"] == 4
    link = mine.get(
        CHECKPOINT.format(**table[("DELETE", CHECKPOINT)]["path"]) + "/archive",
        follow_redirects=False,
    )
    assert link.status_code == 302
    assert TestClient(app).get(link.headers["location"]).status_code == 200  # keyless
    assert (
        json.loads(mine.get(f"/api/v1/samplers/{alice['sampling']}").text)["model_path"]
        == alice["sampler_path"]
    )


def test_every_route_but_health_needs_a_known_key(app, alice):
    for key in ("", "tml-unknown"):
        client = TestClient(app, headers={"X-API-Key": key} if key else {})
        for (method, path), probe in probes(alice, alice["session"]).items():
            assert call(client, method, path, probe).status_code == 401, (method, path)
        for method, path in (OPEN | LISTINGS) - {("GET", "/api/v1/healthz")}:
            assert client.request(method, path, json={}).status_code == 401, (method, path)
        for url in ("/", "/static/dashboard.js", "/static/dashboard.css"):
            page = client.get(url)
            assert page.status_code == 200 and alice["model"] not in page.text, url
        assert client.get("/static/..%2Fapp.py").status_code == 404
