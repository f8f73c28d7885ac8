"""Sessions over REST: the official SDK's `RestClient.list_sessions` and `get_session`
against `tinkerd serve`, answered from the store and scoped to the API key."""

import datetime

import pytest
import tinker
from helpers import KEYS, TINY
from tinker import types

ALICE, BOB = KEYS


def test_sessions_list_and_describe_their_runs_and_samplers(server):
    sdk = tinker.ServiceClient(
        base_url=server.url, api_key=ALICE, user_metadata={"experiment": "rest-sessions"}
    )
    first = sdk.create_lora_training_client(base_model=TINY, rank=4).result()
    second = sdk.create_lora_training_client(base_model=TINY, rank=4).result()
    sampler = first.save_weights_and_get_sampling_client().result()
    session_id = first.model_id.split(":")[0]
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)

    listed = rest.list_sessions(limit=1000).result().sessions
    assert session_id in listed
    described = rest.get_session(session_id).result()
    assert described.training_run_ids == [first.model_id, second.model_id]
    assert described.sampler_ids == [sampler._sampling_session_id]
    assert described.user_metadata == {"experiment": "rest-sessions"}

    # Pages: oldest first, offset and limit honoured.
    everything = rest.list_sessions(limit=1000).result().sessions
    assert rest.list_sessions(limit=1, offset=len(everything) - 1).result().sessions == [
        everything[-1]
    ]
    with pytest.raises(tinker.BadRequestError):
        rest.list_sessions(limit=0).result()

    # Another key sees none of it: not listed, and its id looks absent.
    bob = tinker.RestClient(base_url=server.url, api_key=BOB)
    assert session_id not in bob.list_sessions(limit=1000).result().sessions
    with pytest.raises(tinker.NotFoundError):
        bob.get_session(session_id).result()
    with pytest.raises(tinker.NotFoundError):
        rest.get_session("session-unknown").result()

    # A finished session still describes its runs; its samplers are gone.
    sdk.close("success").result()
    after = rest.get_session(session_id).result()
    assert after.training_run_ids == [first.model_id, second.model_id]
    assert after.sampler_ids == []


def test_search_sessions_filters_pages_and_reports_status(server):
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    tag = f"search-{datetime.datetime.now().timestamp()}"
    clients, ids = [], []
    for i, name in enumerate(["Nightly run one", "nightly run two", "weekly"]):
        sdk = tinker.ServiceClient(
            base_url=server.url,
            api_key=ALICE,
            user_metadata={"tag": tag, "i": str(i)},
            display_name=name,
        )
        training = sdk.create_lora_training_client(base_model=TINY, rank=4).result()
        if i == 0:
            training.save_state("searched").result()
        clients.append(sdk)
        ids.append(training.model_id.split(":")[0])
    clients[1].close("errored").result()  # 1 finished by its client; 0 and 2 active

    def search(**fields) -> list:
        request = types.SessionSearchRequest(user_metadata={"tag": tag}, **fields)
        return rest.search_sessions(request).result().sessions

    everything = search()
    assert [s.session_id for s in everything] == ids[::-1]  # newest first
    first = everything[-1]
    assert first.display_name == "Nightly run one" and first.project_id == "default"
    assert first.user_metadata == {"tag": tag, "i": "0"}
    assert first.checkpoints_count == 1 and first.checkpoint_storage_bytes > 0
    assert first.status.type == "active"
    assert [s.session_id for s in search(display_name="NIGHTLY run")] == [ids[1], ids[0]]
    assert [s.session_id for s in search(session_id=ids[2])] == [ids[2]]
    finished = search(statuses=[types.ClientFinishedSessionStatusQuery(reasons=["errored"])])
    assert [s.session_id for s in finished] == [ids[1]]
    assert finished[0].status.reason.type == "errored"
    active = search(statuses=[types.ActiveSessionStatusQuery()])
    assert [s.session_id for s in active] == [ids[2], ids[0]]

    # Pages of one, following next_cursor, give the same sessions in the same order.
    request = types.SessionSearchRequest(user_metadata={"tag": tag}, limit=1)
    paged = []
    while True:
        page = rest.search_sessions(request).result()
        paged += [s.session_id for s in page.sessions]
        if page.next_cursor is None:
            break
        request = request.model_copy(update={"cursor": page.next_cursor})
    assert paged == ids[::-1]

    bob = tinker.RestClient(base_url=server.url, api_key=BOB)
    for owner in (types.OwnSearchOwner(), types.AccessibleSearchOwner()):
        request = types.SessionSearchRequest(user_metadata={"tag": tag}, owner=owner)
        assert bob.search_sessions(request).result().sessions == []
    with pytest.raises(tinker.BadRequestError, match="no project"):
        search(project_ids=["elsewhere"])
    for sdk in clients:
        sdk.close("success").result()
