import os
import tempfile
from collections.abc import Iterator

# The built-in model is made once per test session in a private cache (never ~/.cache),
# before anything imports the engine.
os.environ.setdefault("TINKERD_CACHE", tempfile.mkdtemp(prefix="tinkerd-test-cache-"))
os.environ.setdefault("TINKERD_DATA_DIR", tempfile.mkdtemp(prefix="tinkerd-test-data-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist every worker inherits the controller's cache (the built-in model is
    # made once, under the engine's file lock) but gets a data dir of its own: tests that list
    # the default data dir's checkpoints must not see another worker's.
    os.environ["TINKERD_DATA_DIR"] = tempfile.mkdtemp(prefix="tinkerd-test-data-")

# Tests run with the engine's threading as users get it: helpers imports torch, which
# fixes libgomp's wait policy, so choose it first (tinkerd.engine would be too late).
from tinkerd.threads import prefer_passive_wait  # noqa: E402

prefer_passive_wait()

import pytest  # noqa: E402
from helpers import KEYS, TINY, ServerProcess, free_port, make_datum  # noqa: E402, F401

from tinkerd.engine import Engine  # noqa: E402
from tinkerd.types import Datum  # noqa: E402

_engines: list[Engine] = []  # the session's engine, once a test has asked for it


@pytest.fixture(scope="session")
def engine() -> Engine:
    _engines.append(Engine())
    return _engines[0]


@pytest.fixture(autouse=True)
def _unload_runs_left_behind() -> Iterator[None]:
    """Runs a test creates on the session's engine are unloaded after it: every live adapter
    on a base slows each later forward of that base (measured: a step took 0.3 s with 10
    live runs, 1.4 s with 65), which made the embedded tests 3-4x slower than their HTTP
    twins, whose server frees a session's runs when the session ends. Runs made by module-
    or session-scoped fixtures exist before this snapshot and are kept."""
    before = set(_engines[0].model_ids()) if _engines else set()
    yield
    if _engines:
        for model_id in set(_engines[0].model_ids()) - before:
            _engines[0].unload_model(model_id)


@pytest.fixture
def batch() -> list[Datum]:
    """Three data of different lengths (exercises padding)."""
    return [
        make_datum([256, *b"hello world"]),
        make_datum([256, *b"abc"], [0.0, 1.0, 1.0]),
        make_datum([256, *b"tinkerd trains lora"]),
    ]


# ---------------------------------------------------------------- a real server on loopback


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("server-data"))
    yield proc
    proc.stop()


@pytest.fixture(params=["embedded", "http"])
def service(request, engine):
    """A tinkerd ServiceClient on each transport: in-process, and HTTP to `server`."""
    from tinkerd import ServiceClient
    from tinkerd.client.transport import InProcessTransport

    if request.param == "embedded":
        client = ServiceClient(transport=InProcessTransport(engine=engine))
    else:
        client = ServiceClient(base_url=request.getfixturevalue("server").url, api_key=KEYS[0])
    yield client
    client.close()
