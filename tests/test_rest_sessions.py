"""Sessions over REST: the official SDK's `RestClient.list_sessions` and `get_session`
against `tinkerd serve`, answered from the store and scoped to the API key."""

import pytest
import tinker
from conftest import KEYS, TINY

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
