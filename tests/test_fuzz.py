"""Schema-driven fuzzing (schemathesis) of every operation in the server's OpenAPI schema,
against the real engine: whatever arrives, the answer is never a 5xx.

Random ids only reach the "not found" branch, so ids in generated bodies and paths are
swapped, half of the time, for ones of a real session, run, sampler and request: the
fuzzer then gets past ownership checks into the validation of every other field."""

import pytest
import schemathesis
from conftest import KEYS, TINY, make_datum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tinkerd import wire_proto
from tinkerd.server.app import Server, create_app

FUZZ = settings(
    max_examples=25,
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
    }


def with_real_ids(case, ids: dict[str, str], swap: list[bool]) -> None:
    for container in (case.path_parameters, case.body if isinstance(case.body, dict) else None):
        for key in list(container or {}):
            if key in ids and swap and swap.pop():
                container[key] = ids[key]


def test_no_request_makes_the_server_fail(app, real_ids):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # every route is in the schema, so every route is fuzzed
    for operation in operations:

        @given(case=operation.as_strategy(), swap=st.lists(st.booleans(), min_size=8))
        @FUZZ
        def no_server_error(case, swap):
            with_real_ids(case, real_ids, swap)
            for key in (KEYS[0], "tml-wrong-key"):
                case.headers = {**(case.headers or {}), "X-API-Key": key}
                response = case.call()
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} {case.body!r} -> "
                    f"{response.status_code}: {response.text[:500]}"
                )

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
