"""Released `tinker` SDKs, from the oldest with sessions (0.3.0) to 0.38, against one
`tinkerd serve`: each creates a run, trains, forwards, saves, samples and lists
(tests/sdk_release_script.py), in its own install.

Each release is `pip install --no-deps --target` into a cache directory (once; reused by
later test sessions) and put first on the script's PYTHONPATH, over this environment,
whose packages (those tinker 0.38 needs) are a superset of what the older releases
import. The releases chosen are the ones where what the SDK sends or expects changes:
  0.3.0   oldest with sessions; JSON everywhere; lists checkpoints at /models/{id}/checkpoints
  0.16.1  last before client/config: JSON forward_backward and /forward, JSON results only
  0.18.2  first with client/config; asks for protobuf sample results, JSON for the rest
  0.22.7  first that can zstd-compress (only if client/config says so; tinkerd does not)
  0.23.3, 0.24.1  pinned by users; JSON forward_backward unless told to send protobuf
  0.26.2  first that always sends forward_backward as protobuf
  0.30.4, 0.36.0, 0.38.0  later releases
Encodings no release sends with tinkerd's client/config (zstd, gzip) are checked with
hand-made requests below.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import zstandard
from helpers import KEYS, TESTS, TINY, make_datum

from tinkerd import wire_proto

RELEASES = [
    "0.3.0",
    "0.16.1",
    "0.18.2",
    "0.22.7",
    "0.23.3",
    "0.24.1",
    "0.26.2",
    "0.30.4",
    "0.36.0",
    "0.38.0",
]
NEED_TORCH = {"0.3.0"}  # imports it unguarded; later releases import it only if present
SCRIPT = TESTS / "sdk_release_script.py"
CACHE = Path(os.environ.get("TINKERD_SDK_CACHE", Path(tempfile.gettempdir()) / "tinkerd-sdks"))


def install(version: str) -> Path:
    """The directory holding tinker==version (installed on first use, atomically)."""
    target = CACHE / f"tinker-{version}"
    if (target / "tinker").is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".tinker-{version}-"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "--no-deps", "--target", str(staging), f"tinker=={version}"],
        check=True,
        timeout=300,
    )
    try:
        staging.rename(target)
    except OSError:  # another test session installed it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="module")
def installed() -> dict[str, Path]:
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(RELEASES, pool.map(install, RELEASES)))


def run_release(server, version: str, target: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(target)}  # this release, over this environment
    done = subprocess.run(
        [sys.executable, str(SCRIPT), server.url, KEYS[0], TINY, f"release-{version}"]
        + (["torch"] if version in NEED_TORCH else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"tinker {version}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_release_trains_samples_saves_and_lists(server, installed):
    with ThreadPoolExecutor(2) as pool:  # the server packs concurrent runs together
        results = dict(
            zip(RELEASES, pool.map(lambda v: run_release(server, v, installed[v]), RELEASES))
        )
    for version, got in results.items():
        assert got["version"] == version and got["module"].startswith(str(installed[version]))
        losses = got["losses"]
        assert all(b < a for a, b in zip(losses, losses[1:])), (version, losses)
        assert got["logprob_lengths"] == [7, 11], version
        assert got["state_path"] == f"tinker://{got['model_id']}/weights/release-{version}"
        assert got["sample_lengths"] == [5, 5], version
        assert got["state_path"] in got["checkpoints"], version
    # Same data, same seed-free init per base model: every release's first loss agrees.
    first = {round(r["losses"][0], 3) for r in results.values()}
    assert len(first) == 1, first


# ---------------------------------------------------------------- encodings by hand


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/{path}",
        headers={"X-API-Key": KEYS[0], **kwargs.pop("headers", {})},
        **kwargs,
    )


def result(server, request_id: str, accept: str | None) -> httpx.Response:
    headers = {"Accept": accept} if accept else {}
    while True:
        got = post(server, "retrieve_future", json={"request_id": request_id}, headers=headers)
        if got.status_code != 408:
            return got


@pytest.fixture
def run_id(server) -> str:
    """A fresh run: its seq_ids start at 1."""
    session = post(server, "create_session", json={}).json()["session_id"]
    body = {
        "session_id": session,
        "model_seq_id": 0,
        "base_model": TINY,
        "lora_config": {"rank": 4},
    }
    created = post(server, "create_model", json=body).json()
    return result(server, created["request_id"], None).json()["model_id"]


def test_forward_backward_in_every_encoding_gives_the_same_answer(server, run_id):
    """protobuf, zstd- and gzip-compressed protobuf, JSON: one result, in the encoding the
    caller's Accept asks for."""
    import gzip

    data = [make_datum([256, *b"encodings"])]
    proto = [  # seq_ids 1-3: distinct requests, run in order
        wire_proto.encode_forward_backward_request(run_id, seq, data, "cross_entropy", None, True)
        for seq in (1, 2, 3)
    ]
    as_json = {
        "model_id": run_id,
        "seq_id": 4,
        "forward_input": {
            "data": [d.model_dump(mode="json") for d in data],
            "loss_fn": "cross_entropy",
        },
    }
    sent = [
        post(
            server,
            "forward_backward",
            content=proto[0],
            headers={"Content-Type": "application/x-protobuf"},
        ),
        post(
            server,
            "forward_backward",
            content=zstandard.ZstdCompressor().compress(proto[1]),
            headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"},
        ),
        post(
            server,
            "forward_backward",
            content=gzip.compress(proto[2]),
            headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
        ),
        post(server, "forward", json=as_json),
    ]
    assert len({r.json()["request_id"] for r in sent}) == 4
    outputs = []
    for response in sent:
        assert response.status_code == 200, response.text
        request_id = response.json()["request_id"]
        as_proto = result(server, request_id, "application/x-protobuf")
        assert as_proto.headers["content-type"] == "application/x-protobuf"
        answered_json = result(server, request_id, "application/json")
        assert answered_json.headers["content-type"] == "application/json"
        decoded = wire_proto.decode_forward_backward_output(as_proto.content)
        assert answered_json.json()["metrics"] == decoded.metrics
        outputs.append(answered_json.json())
    assert all(o == outputs[0] for o in outputs), outputs
    logprobs = outputs[0]["loss_fn_outputs"][0]["logprobs"]
    assert len(logprobs["data"]) == 9 and logprobs["dtype"] == "float32"


@pytest.mark.parametrize(
    "headers, body, message",
    [
        ({"Content-Encoding": "zstd"}, b"not zstd", "not valid zstd"),
        ({"Content-Encoding": "br"}, b"x", "unsupported Content-Encoding"),
        ({"Content-Type": "application/json"}, b"{}", "model_id"),
        ({"Content-Type": "application/json"}, b'{"model_id": "m"}', "forward_backward_input"),
    ],
)
def test_bad_encodings_get_a_400(server, headers, body, message):
    response = post(server, "forward_backward", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]


def test_a_rejected_json_request_does_not_hold_back_the_next(server, run_id):
    """An invalid JSON forward_backward uses up its seq_id: the run's next request runs at
    once instead of waiting out the gap timeout."""
    bad = {"model_id": run_id, "seq_id": 1, "forward_backward_input": {"data": "nope"}}
    assert post(server, "forward_backward", json=bad).status_code == 400
    data = [make_datum([256, *b"next"]).model_dump(mode="json")]
    good = {
        "model_id": run_id,
        "seq_id": 2,
        "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"},
    }
    request_id = post(server, "forward_backward", json=good).json()["request_id"]
    started = time.monotonic()
    assert result(server, request_id, None).status_code == 200
    assert time.monotonic() - started < 20  # the gap timeout is 60 s
