"""Server-side custom losses: the graph checker/interpreter, the official SDK's uploads,
and tinkerd's own handles (as loss_fn and as regularizers, in one server-side pass)."""

import copy

import numpy as np
import pytest
import tinker
import torch
from helpers import KEYS, TINY, sdk_loss_request, weighted_nll

from tinkerd import RegularizerSpec
from tinkerd.client.traced_loss import trace
from tinkerd.errors import InvalidRequestError
from tinkerd.fx_loss import compile_loss


def ppo_like(logprobs, sampling_logprobs, advantages):
    ratio = torch.exp(logprobs - sampling_logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    return loss, {"custom/ratio:mean": ratio.mean()}


def scaled_square(logprobs):
    return 0.5 * (logprobs**2).mean() + logprobs.shape[0] * 0.0, {}


RANKS = {
    weighted_nll: {"logprobs": 1, "weights": 1},
    ppo_like: {"logprobs": 1, "sampling_logprobs": 1, "advantages": 1},
    scaled_square: {"logprobs": 1},
}


def sdk_request(fn):
    """The create_custom_loss body exactly as the official SDK builds it."""
    return sdk_loss_request(fn, RANKS[fn])


@pytest.mark.parametrize("fn", list(RANKS))
def test_compiled_graph_equals_the_python_function(fn):
    compiled = compile_loss(sdk_request(fn))
    names = list(RANKS[fn])[1:]
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(5, generator=gen) for n in names}
    lp1 = (-torch.rand(5, generator=gen)).requires_grad_()
    lp2 = lp1.detach().clone().requires_grad_()
    loss1, metrics1 = compiled(lp1, inputs)
    loss2, metrics2 = fn(lp2, *inputs.values())
    torch.testing.assert_close(loss1, loss2)
    assert set(metrics1) == set(metrics2)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(lp1.grad, lp2.grad)


def test_our_tracer_writes_what_the_sdk_writes():
    for fn in RANKS:
        assert trace(fn, RANKS[fn]).graph == sdk_request(fn)["graph"]


def edited(mutate):
    request = copy.deepcopy(sdk_request(ppo_like))
    mutate(request["graph"]["nodes"])
    return request


def set_target(nodes, name, op, target):
    node = next(n for n in nodes if n["name"] == name)
    node["op"], node["target"] = op, target


@pytest.mark.parametrize(
    "request_, message",
    [
        (edited(lambda n: set_target(n, "exp", "call_function", "builtins.eval")), "builtins.eval"),
        (edited(lambda n: set_target(n, "exp", "call_function", "os.system")), "os.system"),
        (edited(lambda n: set_target(n, "exp", "call_module", "linear")), "call_module"),
        (edited(lambda n: set_target(n, "exp", "get_attr", "weight")), "get_attr"),
        (edited(lambda n: set_target(n, "exp", "call_method", "numpy")), "numpy"),
        (edited(lambda n: set_target(n, "exp", "call_function", "torch.zeros")), "torch.zeros"),
        (edited(lambda n: n[4]["args"].__setitem__(0, {"ref": "nowhere"})), "'nowhere'"),
        (edited(lambda n: n[4]["args"].__setitem__(0, {"device": "cuda"})), "'device'"),
        (
            {**sdk_request(ppo_like), "graph": {"format": 99, "nodes": []}},
            "format 1",
        ),
    ],
)
def test_graphs_outside_the_allowlist_are_refused(request_, message):
    with pytest.raises(InvalidRequestError, match="refused|format") as info:
        compile_loss(request_)
    assert message.strip("'") in str(info.value)


# ---------------------------------------------------------------- through the engine


def data():
    from tinkerd.types import Datum, ModelInput

    tokens = [256, *b"server side"]
    n = len(tokens) - 1
    return [
        Datum(
            model_input=ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * n},
        )
    ]


def test_handles_as_loss_and_regularizers_match_python_functions(service):
    """A fully traced regularized loss (one server-side pass over HTTP) reports and trains
    exactly like the same functions in Python."""
    nll = service.create_custom_loss(weighted_nll, RANKS[weighted_nll]).result()
    square = service.create_custom_loss(scaled_square, RANKS[scaled_square]).result()
    assert nll.loss_id is not None

    def python_nll(batch, logprobs_list):
        lp = logprobs_list[0]
        return -(lp * batch[0].loss_fn_inputs["weights"].to_torch()).sum()

    def python_square(batch, logprobs_list):
        return 0.5 * (logprobs_list[0] ** 2).mean()

    results = []
    for base, reg in [(nll, square), (python_nll, python_square)]:
        client = service.create_lora_training_client(TINY, rank=4, seed=3)
        out = client.forward_backward_custom(
            data(),
            base,
            regularizers=[RegularizerSpec(fn=reg, weight=2.0, name="sq")],
            track_grad_norms=True,
        ).result()
        norm = client.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
        results.append((out, norm.metrics["grad_norm"]))
    (traced, traced_norm), (python, python_norm) = results
    assert traced.loss_total == pytest.approx(python.loss_total, rel=1e-5)
    assert traced.regularizers["sq"].grad_norm == pytest.approx(
        python.regularizers["sq"].grad_norm, rel=1e-5
    )
    assert traced.total_grad_norm == pytest.approx(python.total_grad_norm, rel=1e-5)
    assert traced.base_loss.custom["custom/nll:sum"] == pytest.approx(traced.base_loss.value)
    assert traced_norm == pytest.approx(python_norm, rel=1e-5)


def test_official_sdk_uploads_and_runs_a_server_side_loss(server):
    sdk = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
    handle = sdk.create_custom_loss(ppo_like, RANKS[ppo_like]).result()
    assert handle.loss_id  # uploaded, not run client-side
    client = sdk.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    tokens = [256, *b"ppo on server"]
    n = len(tokens) - 1
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "weights": [1.0] * n,
            "sampling_logprobs": np.full(n, -2.0, "f4"),
            "advantages": np.ones(n, "f4"),
        },
    )
    lps = client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    out = client.forward_backward_custom([datum], handle).result()
    ratio = torch.exp(lps.to_torch() + 2.0)
    expected = -torch.minimum(ratio, torch.clamp(ratio, 0.8, 1.2)).sum()
    assert out.metrics["loss:sum"] == pytest.approx(expected.item(), rel=1e-4)
    assert out.metrics["custom/ratio:mean"] == pytest.approx(ratio.mean().item(), rel=1e-4)
    sdk.close("success").result()


def test_official_sdk_upload_of_a_refused_graph_fails(server):
    import httpx

    session = httpx.post(
        f"{server.url}/api/v1/create_session", json={}, headers={"X-API-Key": KEYS[0]}
    ).json()["session_id"]
    body = {
        **edited(lambda n: set_target(n, "exp", "call_function", "builtins.exec")),
        "session_id": session,
        "custom_loss_seq_id": 0,
    }
    response = httpx.post(
        f"{server.url}/api/v1/create_custom_loss", json=body, headers={"X-API-Key": KEYS[0]}
    )
    assert response.status_code == 400
    assert "builtins.exec" in response.json()["detail"]
