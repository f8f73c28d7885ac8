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

import pytest  # noqa: E402

from tinkerd.engine import Engine  # noqa: E402
from tinkerd.types import Datum, ModelInput  # noqa: E402

TINY = "tinkerd/tiny"


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


def make_datum(tokens: list[int], weights: list[float] | None = None) -> Datum:
    """Next-token datum over `tokens` (input = tokens[:-1], targets = tokens[1:])."""
    n = len(tokens) - 1
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "weights": weights if weights is not None else [1.0] * n,
        },
    )


@pytest.fixture
def batch() -> list[Datum]:
    """Three data of different lengths (exercises padding)."""
    return [
        make_datum([256, *b"hello world"]),
        make_datum([256, *b"abc"], [0.0, 1.0, 1.0]),
        make_datum([256, *b"tinkerd trains lora"]),
    ]


# ---------------------------------------------------------------- a real server on loopback

KEYS = ("tml-alice-key", "tml-bob-key")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`tinkerd serve` in a subprocess on a free loopback port."""

    def __init__(
        self,
        data_dir,
        *extra: str,
        env: dict[str, str] | None = None,
        launcher: list[str] | None = None,
    ):
        """`launcher`: what runs `serve ARGS` (default `python -m tinkerd.cli`)."""
        self.data_dir = data_dir
        self.extra = extra
        self.launcher = launcher
        self.port = free_port()
        self._lines: list[bytes] = []  # what every start of the server printed, in order
        self.url = f"http://127.0.0.1:{self.port}"
        self.start(env)

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start `tinkerd serve` (again, after `stop`: same port and data dir)."""
        import subprocess
        import sys
        import threading

        args = [
            *(self.launcher or [sys.executable, "-m", "tinkerd.cli"]),
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--poll-timeout",
            "2",
            *self.extra,
        ]
        for key in KEYS:
            args += ["--api-key", key]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        # Drained on a thread: a server that logs more than a pipe holds must never block.
        self._reader = threading.Thread(
            target=self._lines.extend, args=(self.proc.stdout,), daemon=True
        )
        self._reader.start()
        self.wait_ready()

    def output(self) -> str:
        """Everything the server printed so far, over all its starts (all of it once `stop`
        returned)."""
        return b"".join(self._lines).decode(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:  # generous: CI machines are slow
        import time

        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(timeout=10)
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/api/v1/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)


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
