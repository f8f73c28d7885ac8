"""Helpers shared by several test modules: raw wire-protocol calls to a `ServerProcess`
(what the official SDK sends, without the SDK) and a custom loss."""

import os
from pathlib import Path

import httpx
from tinker import types

from tinkerd import wire_proto
from tinkerd.types import Datum, ModelInput

ROOT = Path(__file__).resolve().parent.parent
"""The repository."""
TESTS = ROOT / "tests"
"""Where the tests' helper scripts are (sdk_release_script.py, stalled_save_server.py)."""
TINY = "tinkerd/tiny"


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


def sdk_datum(text: bytes, weights=None) -> types.Datum:
    tokens = [256, *text]
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights or [1.0] * n},
    )


def post(server, path, key=KEYS[0], **kwargs):
    return httpx.post(f"{server.url}/api/v1/{path}", headers={"X-API-Key": key}, **kwargs)


def retrieve(server, request_id: str, key=KEYS[0]) -> httpx.Response:
    """Poll retrieve_future through try_again answers (the fixture long-polls 2 s a time)."""
    for _ in range(60):
        response = post(
            server, "retrieve_future", key=key, json={"request_id": request_id}, timeout=30
        )
        if response.status_code != 408:
            return response
    raise AssertionError(f"{request_id} still pending")


def raw_session(server, key=KEYS[0]) -> str:
    return post(server, "create_session", key=key, json={}).json()["session_id"]


def raw_model(server, seq: int = 0, session: str | None = None) -> str:
    session = session or raw_session(server)
    body = {
        "session_id": session,
        "model_seq_id": seq,
        "base_model": TINY,
        "lora_config": {"rank": 4, "seed": 0},
    }
    request_id = post(server, "create_model", json=body).json()["request_id"]
    return retrieve(server, request_id).json()["model_id"]


def fwd_bwd_body(model_id: str, seq_id: int) -> bytes:
    data = [
        Datum(
            model_input=ModelInput.from_ints([256, 1, 2]),
            loss_fn_inputs={"target_tokens": [1, 2, 3], "weights": [1.0, 1.0, 1.0]},
        )
    ]
    return wire_proto.encode_forward_backward_request(
        model_id, seq_id, data, "cross_entropy", None, False
    )


def weighted_nll(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/nll:sum": loss}


NLL_RANKS = {"logprobs": 1, "weights": 1}
"""`weighted_nll`'s inputs and their ranks, as create_custom_loss takes them."""


def gspo_case(logprobs: list[list[float]]) -> tuple[list[dict], float, list[list[float]]]:
    """Two sequences whose sampler logprobs make sequence ratios 1.105 (inside gspo's clip
    [0.8, 1.2]) and 0.607 (outside): their loss_fn_inputs, the hand-computed loss sum, and
    each token's gradient weight d(-loss)/d logprob (ratio x advantage where unclipped, else
    0), which cross_entropy with those weights must reproduce."""
    import math

    shifts, advantages = [-0.1, 0.5], [1.0, -1.0]  # q = lp + shift on masked tokens
    inputs, total, weights = [], 0.0, []
    for lps, shift, adv in zip(logprobs, shifts, advantages):
        mask = [0.0] + [1.0] * (len(lps) - 1)  # the first token is outside the ratio
        sampled = [lp + shift * m for lp, m in zip(lps, mask)]
        ratio = math.exp(-shift)  # exp(mean over the mask of lp - q)
        clipped = min(max(ratio, 0.8), 1.2)
        inputs.append({"logprobs": sampled, "advantages": [adv] * len(lps), "mask": mask})
        total += len(lps) * -min(ratio * adv, clipped * adv)
        unclipped = ratio * adv <= clipped * adv
        weights.append([ratio * adv if unclipped else 0.0] * len(lps))
    return inputs, total, weights


def sdk_loss_request(fn, ranks: dict[str, int]) -> dict:
    """The create_custom_loss body exactly as the official SDK builds it."""
    from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

    handle = trace_loss(fn, ranks, session_id="s")
    return {
        "name": handle.name,
        "inputs": [{"name": i.name, "rank": i.rank} for i in handle.inputs],
        "graph": encode_graph(handle).model_dump(mode="json"),
    }


def caller(owner):
    """The service's caller for `owner`: a key's fingerprint, or None for the local one."""
    from tinkerd.service import LOCAL, KeyCaller

    return LOCAL if owner is None else KeyCaller(owner)


def create_run(service, owner, base_model, lora, session_id=None, model_seq_id=None) -> str:
    """A new run through the service's CreateModelRequest: its model_id."""
    from tinkerd.requests import CreateModelRequest

    request = CreateModelRequest(
        base_model=base_model, lora_config=lora, session_id=session_id, model_seq_id=model_seq_id
    )
    return service.submit(caller(owner), request).result().model_id


def loss(service, owner, model_id, data, loss_fn, forward_only=False):
    """A forward (or forward_backward) request's future."""
    from tinkerd.requests import ForwardBackwardRequest

    request = ForwardBackwardRequest(
        model_id=model_id, data=data, loss_fn=loss_fn, forward_only=forward_only
    )
    return service.submit(caller(owner), request)
