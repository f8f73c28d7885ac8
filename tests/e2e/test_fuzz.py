"""Schema-driven fuzzing (schemathesis) of every operation in the server's OpenAPI schema,
against the real engine: whatever arrives, the answer is never a 5xx (schemathesis's
`not_a_server_error` check).

Random ids only reach the "not found" branch, so ids in generated bodies, paths and
queries are swapped, half of the time, for ones of a real session, run, sampler, request
and checkpoint: the fuzzer then gets past ownership checks into the validation of every
other field. Numbers and strings are also swapped, some of the time, for the extremes
that broke conversions before (2**70 seeds, 10**400 TTLs, non-ASCII signatures)."""

import urllib.parse

import pytest
import schemathesis
from fastapi.routing import APIRoute
from helpers import KEYS, TINY, make_datum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from starlette.testclient import TestClient

from tinkerd import wire_proto
from tinkerd.server.app import Server, create_app

FUZZ = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same inputs every run: a failure here is reproducible
)


@pytest.fixture(scope="module")
def app(engine, tmp_path_factory):
    server = Server(engine, tmp_path_factory.mktemp("fuzz"), list(KEYS), [TINY], 0.05)
    return create_app(server)


def finished(client: TestClient, response) -> dict:
    request_id = response.json()["request_id"]
    while True:
        result = client.post("/api/v1/retrieve_future", json={"request_id": request_id})
        if result.status_code != 408:
            return result.json() | {"request_id": request_id}


@pytest.fixture(scope="module")
def real_ids(app) -> dict[str, str]:
    client = TestClient(app, headers={"X-API-Key": KEYS[0]})
    session_id = client.post("/api/v1/create_session", json={}).json()["session_id"]
    lora = {"rank": 4, "seed": 0}
    body = {"session_id": session_id, "model_seq_id": 0, "base_model": TINY, "lora_config": lora}
    created = finished(client, client.post("/api/v1/create_model", json=body))
    model_id = created["model_id"]
    save = {"model_id": model_id, "seq_id": 1, "path": "fuzz"}
    path = finished(client, client.post("/api/v1/save_weights", json=save))["path"]
    sampling = {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": TINY}
    response = client.post("/api/v1/create_sampling_session", json=sampling)
    return {
        "session_id": session_id,
        "model_id": model_id,
        "sampling_session_id": response.json()["sampling_session_id"],
        "sampler_id": response.json()["sampling_session_id"],
        "request_id": created["request_id"],
        "tinker_path": path,
        "path": path,
        "model_path": path,
        "kind": "weights",
        "name": "fuzz",
    }


EXTREMES = [2**70, -(2**70), 10**400, 2**63, -1, 0, 1e308, "é\u2603\x00", "", "../../x"]


def extreme(value, draw: list[int]):
    """`value` with, some of the time, a number or string swapped for an extreme one."""
    if isinstance(value, dict):
        return {k: extreme(v, draw) for k, v in value.items()}
    if isinstance(value, list):
        return [extreme(v, draw) for v in value]
    if isinstance(value, bool | None) or not draw:
        return value
    pick = draw.pop()
    return EXTREMES[pick] if pick < len(EXTREMES) else value


def with_real_ids(case, ids: dict[str, str], swap: list[bool]) -> None:
    for container in (
        case.path_parameters,
        case.query,
        case.body if isinstance(case.body, dict) else None,
    ):
        for key in list(container or {}):
            if key in ids and swap and swap.pop():
                container[key] = ids[key]


def test_every_route_is_in_the_fuzzed_schema(app):
    """A route missing from the OpenAPI schema would never be fuzzed by it: only the
    dashboard's page and static files are, and they are fuzzed below."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    fuzzed = {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()}
    routes = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    assert routes - fuzzed == {("GET", "/"), ("GET", "/static/{name}")}
    assert len(fuzzed) >= 20


def test_no_request_makes_the_server_fail(app, real_ids):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:

        @given(
            case=operation.as_strategy(),
            swap=st.lists(st.booleans(), min_size=8),
            draw=st.lists(st.integers(0, 2 * len(EXTREMES)), max_size=6),
        )
        @FUZZ
        def no_server_error(case, swap, draw):
            with_real_ids(case, real_ids, swap)
            if isinstance(case.body, dict | list):
                case.body = extreme(case.body, draw)
            case.query = extreme(case.query, draw) if case.query else case.query
            for key in (KEYS[0], "tml-wrong-key"):
                case.headers = {**(case.headers or {}), "X-API-Key": key}
                response = case.call()
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} {case.query!r} {case.body!r} -> "
                    f"{response.status_code}: {response.text[:500]}"
                )
                case.validate_response(response, checks=[not_a_server_error])

        no_server_error()


def test_malformed_forward_backward_bodies_are_refused_not_crashed_on(app, real_ids):
    """forward_backward takes protobuf, which the schema cannot describe: fuzz its bytes."""
    client = TestClient(app, headers={"X-API-Key": KEYS[0]})
    valid = wire_proto.encode_forward_backward_request(
        real_ids["model_id"], 1000, [make_datum([256, 1, 2, 3])], "cross_entropy", None, True
    )

    @given(
        st.one_of(
            st.binary(max_size=200),
            st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=8)).map(
                lambda edit: valid[: edit[0]] + edit[1] + valid[edit[0] + len(edit[1]) :]
            ),
        )
    )
    @FUZZ
    def refused(body: bytes):
        response = client.post(
            "/api/v1/forward_backward",
            content=body,
            headers={"Content-Type": "application/x-protobuf"},
        )
        assert response.status_code < 500, response.text[:500]

    refused()


def test_dashboard_pages_outside_the_schema_never_fail(app):
    client = TestClient(app)
    assert client.get("/").status_code == 200

    @given(st.text(max_size=40))
    @FUZZ
    def static_file(name: str):
        response = client.get("/static/" + urllib.parse.quote(name, safe=""))
        assert response.status_code < 500, response.text[:200]

    static_file()
