"""RestClient: the official SDK's against `tinkerd serve` on loopback (every REST method,
scoped to the API key, publishing), and tinkerd's own on both transports."""

import asyncio
import datetime
import io
import tarfile
import time

import httpx
import pytest
import tinker
from helpers import KEYS, TINY

from tinkerd.errors import NotFoundError

ALICE, BOB = KEYS


@pytest.fixture(scope="module")
def alice_run(server):
    """Alice's run with a training checkpoint and named sampler weights (official SDK)."""
    sdk = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    client = sdk.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    state = client.save_state("rest-state").result().path
    sampler = client.save_weights_for_sampler("rest-sampler").result().path
    yield client.model_id, state, sampler, client
    sdk.close("success").result()


def checkpoint_dir(server, path: str):
    return server.data_dir / "checkpoints" / path.removeprefix("tinker://")


def test_official_rest_client_every_method(server, alice_run):
    run, state, sampler, training = alice_run
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)

    runs = rest.list_training_runs(limit=1000).result()
    assert run in [r.training_run_id for r in runs.training_runs]
    assert runs.cursor.total_count >= 1
    assert rest.list_training_runs(limit=1, offset=0).result().cursor.limit == 1

    info = rest.get_training_run(run).result()
    assert (info.base_model, info.lora_rank, info.is_lora) == (TINY, 4, True)
    assert info.last_checkpoint.tinker_path == state
    assert info.last_sampler_checkpoint.tinker_path == sampler
    assert rest.get_training_run_by_tinker_path(state).result().training_run_id == run
    assert rest.get_weights_info_by_tinker_path(state).result().lora_rank == 4

    listed = rest.list_checkpoints(run).result().checkpoints
    assert [(c.checkpoint_id, c.checkpoint_type, c.tinker_path) for c in listed] == [
        ("weights/rest-state", "training", state),
        ("sampler_weights/rest-sampler", "sampler", sampler),
    ]
    assert all(c.size_bytes > 0 and not c.public for c in listed)
    mine = rest.list_user_checkpoints(limit=1000).result()
    assert {state, sampler} <= {c.tinker_path for c in mine.checkpoints}
    times = [c.time for c in mine.checkpoints]
    assert times == sorted(times, reverse=True)  # newest first

    # publish / unpublish round trip; idempotent (the SDK would retry a 409 for minutes)
    for _ in range(2):
        rest.publish_checkpoint_from_tinker_path(state).result()
        assert rest.list_checkpoints(run).result().checkpoints[0].public
    for _ in range(2):
        rest.unpublish_checkpoint_from_tinker_path(state).result()
        assert not rest.list_checkpoints(run).result().checkpoints[0].public

    # a TTL shows in listings, can be lifted, and deletes the checkpoint once it passes
    rest.set_checkpoint_ttl_from_tinker_path(state, 3600).result()
    assert rest.list_checkpoints(run).result().checkpoints[0].expires_at is not None
    rest.set_checkpoint_ttl_from_tinker_path(state, None).result()
    assert rest.list_checkpoints(run).result().checkpoints[0].expires_at is None
    with pytest.raises(tinker.BadRequestError):
        rest.set_checkpoint_ttl_from_tinker_path(state, 0).result()
    short = training.save_state("short-lived").result().path
    rest.set_checkpoint_ttl_from_tinker_path(short, 1).result()
    time.sleep(1.1)
    with pytest.raises(tinker.NotFoundError):
        rest.get_weights_info_by_tinker_path(short).result()
    assert not checkpoint_dir(server, short).exists()

    # delete: by id, then by path; both gone from listings and from disk
    a = training.save_state("to-delete-a").result().path
    b = training.save_state("to-delete-b").result().path
    rest.delete_checkpoint(run, "weights/to-delete-a").result()
    rest.delete_checkpoint_from_tinker_path(b).result()
    assert [c.tinker_path for c in rest.list_checkpoints(run).result().checkpoints] == [
        state,
        sampler,
    ]
    assert not checkpoint_dir(server, a).exists() and not checkpoint_dir(server, b).exists()
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(a).result()
    with pytest.raises(tinker.NotFoundError):
        rest.get_weights_info_by_tinker_path(a).result()


def test_another_key_sees_nothing_until_published(server, alice_run):
    run, state, sampler, _ = alice_run
    alice = tinker.RestClient(base_url=server.url, api_key=ALICE)
    bob = tinker.RestClient(base_url=server.url, api_key=BOB)
    bob_sdk = tinker.ServiceClient(base_url=server.url, api_key=BOB)

    def bob_cannot_read() -> None:
        for call in (
            lambda: bob.get_training_run(run),
            lambda: bob.get_training_run(run, access_scope="accessible"),
            lambda: bob.list_checkpoints(run),
            lambda: bob.get_weights_info_by_tinker_path(state),
        ):
            with pytest.raises(tinker.NotFoundError):
                call().result()
        listed = bob.list_user_checkpoints(limit=1000).result().checkpoints
        assert state not in {c.tinker_path for c in listed}
        runs = bob.list_training_runs(limit=1000, access_scope="accessible").result()
        assert run not in {r.training_run_id for r in runs.training_runs}
        with pytest.raises(Exception, match="no checkpoint"):
            bob_sdk.create_training_client_from_state(state).result()
        with pytest.raises(Exception, match="no checkpoint"):
            bob_sdk.create_sampling_client(model_path=sampler).result().sample(
                tinker.types.ModelInput.from_ints([256, 1]), 1, tinker.types.SamplingParams()
            ).result()

    bob_cannot_read()
    for change in (
        lambda: bob.delete_checkpoint_from_tinker_path(state),
        lambda: bob.publish_checkpoint_from_tinker_path(state),
        lambda: bob.unpublish_checkpoint_from_tinker_path(state),
    ):
        with pytest.raises(tinker.NotFoundError):
            change().result()
    assert checkpoint_dir(server, state).exists()

    alice.publish_checkpoint_from_tinker_path(state).result()
    alice.publish_checkpoint_from_tinker_path(sampler).result()
    try:
        assert bob.get_weights_info_by_tinker_path(state).result().lora_rank == 4
        shared = bob.list_checkpoints(run).result().checkpoints
        assert {c.tinker_path for c in shared} == {state, sampler} and all(c.public for c in shared)
        seen = bob.get_training_run(run, access_scope="accessible").result()
        assert seen.model_owner != alice.get_training_run(run).result().model_owner
        runs = bob.list_training_runs(limit=1000, access_scope="accessible").result()
        assert run in {r.training_run_id for r in runs.training_runs}
        with pytest.raises(tinker.NotFoundError):  # "owned" is still only Bob's own
            bob.get_training_run(run).result()
        resumed = bob_sdk.create_training_client_from_state(state).result()
        assert resumed.get_info().model_data.model_name == TINY
        sampled = (
            bob_sdk.create_sampling_client(model_path=sampler)
            .result()
            .sample(
                tinker.types.ModelInput.from_ints([256, 1]),
                1,
                tinker.types.SamplingParams(max_tokens=2),
            )
        )
        assert len(sampled.result().sequences[0].tokens) == 2
        for change in (  # published is readable, never Bob's to change
            lambda: bob.delete_checkpoint_from_tinker_path(state),
            lambda: bob.unpublish_checkpoint_from_tinker_path(state),
        ):
            with pytest.raises(tinker.NotFoundError):
                change().result()
        assert checkpoint_dir(server, state).exists()
    finally:
        alice.unpublish_checkpoint_from_tinker_path(state).result()
        alice.unpublish_checkpoint_from_tinker_path(sampler).result()
    bob_cannot_read()
    bob_sdk.close("success").result()


def test_archive_download_is_signed_and_scoped(server, alice_run):
    """The official SDK 0.38 has no archive method; tinkerd's RestClient speaks the route
    older SDKs use (302 to a signed URL)."""
    from tinkerd import RestClient

    run, state, _, _ = alice_run
    alice, bob = RestClient(server.url, ALICE), RestClient(server.url, BOB)
    archive = alice.get_checkpoint_archive_url_from_tinker_path(state).result()
    assert archive.url.startswith(server.url) and ALICE not in archive.url
    response = httpx.get(archive.url)  # no API key: the signature is the permission
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    on_disk = checkpoint_dir(server, state)
    assert set(files) == {p.name for p in on_disk.iterdir()}
    assert all(files[name] == (on_disk / name).read_bytes() for name in files)

    same = alice.get_checkpoint_archive_url(run, "weights/rest-state").result()
    assert same.expires > datetime.datetime.now(datetime.timezone.utc)
    forged = archive.url.replace("signature=", "signature=0")
    assert httpx.get(forged).status_code == 404
    with pytest.raises(NotFoundError):
        bob.get_checkpoint_archive_url_from_tinker_path(state).result()
    alice.publish_checkpoint_from_tinker_path(state).result()
    try:
        assert httpx.get(bob.get_checkpoint_archive_url_from_tinker_path(state).result().url)
    finally:
        alice.unpublish_checkpoint_from_tinker_path(state).result()
    alice.close()
    bob.close()


def test_archive_links_are_revoked_when_the_checkpoint_changes(server, alice_run):
    """A signed link dies at once (not 15 minutes later) when the checkpoint is
    unpublished, or deleted and re-created under the same name."""
    from tinkerd import RestClient

    _, _, _, training = alice_run
    alice, bob = RestClient(server.url, ALICE), RestClient(server.url, BOB)
    path = training.save_state("revoked").result().path
    alice.publish_checkpoint_from_tinker_path(path).result()
    shared = bob.get_checkpoint_archive_url_from_tinker_path(path).result().url
    assert httpx.get(shared).status_code == 200
    alice.unpublish_checkpoint_from_tinker_path(path).result()
    assert httpx.get(shared).status_code == 404  # Bob's link went with the publication
    own = alice.get_checkpoint_archive_url_from_tinker_path(path).result().url
    assert httpx.get(own).status_code == 200
    alice.delete_checkpoint_from_tinker_path(path).result()
    assert training.save_state("revoked").result().path == path  # another checkpoint
    revoked = httpx.get(own)
    assert revoked.status_code == 404 and "revoked" in revoked.json()["detail"]
    fresh = alice.get_checkpoint_archive_url_from_tinker_path(path).result().url
    assert httpx.get(fresh).status_code == 200
    alice.close()
    bob.close()


def test_own_rest_client_on_both_transports(service, tmp_path):
    client = service.create_lora_training_client(TINY, rank=4, seed=2)
    state = client.save_state("own-state").result().path
    sampler = client.save_weights_for_sampler("own-sampler").result().path
    rest = service.create_rest_client()

    runs = rest.list_training_runs(limit=1000).result()
    assert client.model_id in {r.training_run_id for r in runs.training_runs}
    run = rest.get_training_run(client.model_id).result()
    assert (run.base_model, run.lora_rank) == (TINY, 4)
    assert run.last_checkpoint.tinker_path == state
    assert (
        rest.get_training_run_by_tinker_path(sampler).result().training_run_id
        == run.training_run_id
    )
    assert rest.get_weights_info_by_tinker_path(state).result().base_model == TINY
    listed = asyncio.run(rest.list_checkpoints_async(client.model_id)).checkpoints
    assert [c.tinker_path for c in listed] == [state, sampler]
    assert state in {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}

    rest.publish_checkpoint_from_tinker_path(state).result()
    assert rest.list_checkpoints(client.model_id).result().checkpoints[0].public
    rest.unpublish_checkpoint_from_tinker_path(state).result()

    out = rest.download_checkpoint(state, tmp_path / "adapter").result()
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= {
        p.name for p in out.iterdir()
    }
    assert rest.get_checkpoint_archive_url_from_tinker_path(sampler).result().url
    with pytest.raises(Exception, match="not an empty directory"):
        rest.download_checkpoint(state, tmp_path / "adapter").result()

    rest.delete_checkpoint_from_tinker_path(state).result()
    assert [c.tinker_path for c in rest.list_checkpoints(client.model_id).result().checkpoints] == [
        sampler
    ]
    with pytest.raises(NotFoundError):
        rest.get_weights_info_by_tinker_path(state).result()
    rest.close()
