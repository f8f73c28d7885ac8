"""The dashboard: metrics recorded per run and step by a real server while the official SDK
trains, the JSON API behind the page, key isolation, `tinkerd runs show --metrics`, and the
page itself in headless Chromium (charts that grow while the run trains, a screenshot)."""

import os
import shutil

import httpx
import pytest
import tinker
from browser import Browser
from helpers import KEYS, ROOT, TINY, ServerProcess, make_datum

from tinkerd import RegularizerSpec, ServiceClient
from tinkerd.cli import main
from tinkerd.server.app import fingerprint
from tinkerd.server.dashboard import split_key_label
from tinkerd.service.metrics import per_step

CAROL = "tml-carol-key"  # served as --api-key tml-carol-key=carol: a labelled key
ALICE, BOB = KEYS
STEPS = 3
LR = 2e-3
TOKENS = [256, *b"dashboard"]
DOCS_SCREENSHOT = ROOT / "docs" / "dashboard.png"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("dashboard"), "--api-key", f"{CAROL}=carol")
    yield proc
    proc.stop()


def get(served, path: str, key: str = CAROL, **params) -> httpx.Response:
    url = f"{served.url}/api/v1/dashboard{path}"
    return httpx.get(url, headers={"X-API-Key": key}, params=params, timeout=30)


def train(client, steps: int) -> tuple[list[float], list[float]]:
    """`steps` steps of forward_backward + optim_step with the official SDK; their losses
    and grad norms."""
    n = len(TOKENS) - 1
    datum = tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * n},
    )
    losses, norms = [], []
    for _ in range(steps):
        fwd_bwd = client.forward_backward([datum], "cross_entropy")
        optim = client.optim_step(tinker.AdamParams(learning_rate=LR))
        losses.append(fwd_bwd.result().metrics["loss:sum"])
        norms.append(optim.result().metrics["grad_norm"])
    return losses, norms


@pytest.fixture(scope="module")
def sdk(served):
    service = tinker.ServiceClient(base_url=served.url, api_key=CAROL)
    yield service
    service.close("success").result()


@pytest.fixture(scope="module")
def trained(sdk) -> dict:
    """A run of Carol's, trained STEPS steps with the official SDK and checkpointed."""
    client = sdk.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
    losses, norms = train(client, STEPS)
    path = client.save_state("after-3").result().path
    return {"model_id": client.model_id, "losses": losses, "norms": norms, "path": path}


def test_every_step_is_recorded_as_training_reported_it(served, trained):
    runs = get(served, "/runs").json()["runs"]
    run = next(r for r in runs if r["model_id"] == trained["model_id"])
    assert run["base_model"] == TINY and run["lora_rank"] == 4
    assert run["owner"] == "carol" and run["steps"] == STEPS and run["status"] == "active"
    assert run["last_activity"] >= run["created"]

    metrics = get(served, f"/runs/{trained['model_id']}/metrics").json()
    steps = metrics["steps"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert [s["loss"] for s in steps] == pytest.approx(trained["losses"], rel=1e-6)
    assert [s["grad_norm"] for s in steps] == pytest.approx(trained["norms"], rel=1e-6)
    for s in steps:
        assert s["learning_rate"] == pytest.approx(LR)
        assert s["tokens"] == len(TOKENS) - 1
        assert s["step_time_s"] > 0
    assert set(metrics["metric_names"]) == {
        "loss",
        "grad_norm",
        "learning_rate",
        "tokens",
        "step_time_s",
    }
    later = get(served, f"/runs/{trained['model_id']}/metrics", since_step=STEPS).json()
    assert [s["step"] for s in later["steps"]] == [STEPS]  # what the page polls for

    detail = get(served, f"/runs/{trained['model_id']}").json()
    assert [(c["tinker_path"], c["step"]) for c in detail["checkpoints"]] == [
        (trained["path"], STEPS)
    ]
    assert detail["checkpoints"][0]["has_optimizer"] and detail["owner"] == "carol"


def test_another_key_sees_none_of_it(served, trained):
    model_id = trained["model_id"]
    listed = get(served, "/runs", key=BOB)
    assert listed.status_code == 200 and model_id not in listed.text
    for path in (f"/runs/{model_id}", f"/runs/{model_id}/metrics"):
        assert get(served, path, key=BOB).status_code == 404
        assert get(served, path, key="tml-unknown").status_code == 401
        assert get(served, path.replace(model_id, "session-nope:train:0")).status_code == 404
    assert get(served, "/runs", key="").status_code == 401
    bad = get(served, f"/runs/{model_id}/metrics", since_step=-1)
    assert bad.status_code == 422 and "since_step" in bad.text


def test_unlabelled_keys_show_as_a_fingerprint_never_the_key(served):
    client = ServiceClient(base_url=served.url, api_key=ALICE)
    try:
        training = client.create_lora_training_client(TINY, rank=2)
        runs = get(served, "/runs", key=ALICE)
        assert runs.json()["runs"][0]["model_id"] == training.model_id
        assert runs.json()["runs"][0]["owner"] == fingerprint(ALICE)
        assert ALICE not in runs.text and CAROL not in get(served, "/runs").text
    finally:
        client.close()


def weighted_nll(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/nll:sum": loss}


def square(logprobs):
    return 0.5 * (logprobs**2).mean() + logprobs.shape[0] * 0.0, {}


def test_custom_losses_record_their_terms(served):
    """A server-side (uploaded) regularized loss records each regularizer's contribution
    and gradient norm; a Python loss over HTTP records its surrogate at the right step."""
    service = ServiceClient(base_url=served.url, api_key=CAROL)
    try:
        client = service.create_lora_training_client(TINY, rank=4, seed=1)
        nll = service.create_custom_loss(weighted_nll, {"logprobs": 1, "weights": 1}).result()
        sq = service.create_custom_loss(square, {"logprobs": 1}).result()
        regularizers = [RegularizerSpec(fn=sq, weight=0.5, name="sq")]
        data = [make_datum(TOKENS)]
        out = client.forward_backward_custom(
            data, nll, regularizers=regularizers, track_grad_norms=True
        ).result()
        client.optim_step(tinker.AdamParams(learning_rate=LR)).result()

        def python_loss(batch, logprobs_list):
            return -logprobs_list[0].sum(), {}

        client.forward_backward_custom(data, python_loss).result()
        client.optim_step(tinker.AdamParams(learning_rate=LR)).result()
        steps = get(served, f"/runs/{client.model_id}/metrics").json()["steps"]
    finally:
        service.close()
    first, second = steps
    assert first["loss"] == pytest.approx(out.loss_total, rel=1e-6)
    assert first["sq/contribution:sum"] == pytest.approx(out.regularizers["sq"].contribution)
    assert first["sq/grad_norm:mean"] == pytest.approx(out.regularizers["sq"].grad_norm)
    assert first["total_grad_norm:mean"] == pytest.approx(out.total_grad_norm)
    assert first["base_loss:sum"] == pytest.approx(out.base_loss.value)
    assert second["step"] == 2 and "grad_norm" in second and "sq/value:sum" not in second


def test_cli_runs_show_metrics(served, trained, capsys):
    common = ["--base-url", served.url, "--api-key", CAROL]
    assert main(["runs", "show", trained["model_id"], "--metrics", *common]) == 0
    out = capsys.readouterr().out
    assert trained["model_id"] in out and "carol" in out and trained["path"] in out
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "loss"]) :]
    assert table[0].split() == [
        "step",
        "loss",
        "grad_norm",
        "learning_rate",
        "tokens",
        "step_time_s",
    ]
    assert [line.split()[0] for line in table[1:]] == [str(s) for s in range(1, STEPS + 1)]
    assert f"{trained['losses'][0]:.6g}" in table[1]
    with pytest.raises(SystemExit, match="404"):
        main(["runs", "show", trained["model_id"], "--base-url", served.url, "--api-key", BOB])


CHART_POINTS = """(() => {
  const svg = document.querySelector('[data-metric="loss"] svg');
  if (!svg) return -1;
  const vertices = svg.querySelector('polyline').getAttribute('points').trim().split(/ +/);
  return Number(svg.dataset.points) === vertices.length ? vertices.length : -2;
})()"""


LOG_IN = """document.getElementById('key').value = '%s';
document.getElementById('login').requestSubmit();"""
ERROR = "document.getElementById('login-error').textContent"


def test_the_page_shows_the_run_and_its_charts_grow_live(served, sdk, tmp_path):
    """In headless Chromium: the run's row, a loss chart with one point per step trained,
    new points while it trains, its checkpoint, and no key left in the address bar."""
    client = sdk.create_lora_training_client(base_model=TINY, rank=8, seed=2).result()
    train(client, STEPS)
    path = client.save_weights_for_sampler("for-the-screenshot").result().path
    browser = Browser()
    try:
        browser.open(f"{served.url}/")  # no key yet: the page asks for one
        browser.wait_for("document.getElementById('login').hidden", False)
        browser.evaluate(LOG_IN % "tml-wrong")
        browser.wait_for(ERROR, "That key was not accepted.")
        browser.evaluate(LOG_IN % CAROL)
        browser.wait_for("document.getElementById('runs').textContent.includes('carol')", True)
        assert browser.evaluate("sessionStorage.getItem('tinkerd-api-key')") == CAROL

        browser.open(f"{served.url}/#key={CAROL}&run={client.model_id}")
        browser.wait_for(CHART_POINTS, STEPS)
        row = f"document.querySelector('#runs tr[data-run=\"{client.model_id}\"]')"
        assert browser.evaluate(f"{row}.children[4].textContent") == str(STEPS)
        assert browser.evaluate(f"{row}.children[3].textContent") == "carol"
        assert CAROL not in browser.evaluate("location.href")
        # Every chart is drawn (a poll may be redrawing them at any instant: wait, not peek).
        metrics = ["loss", "grad_norm", "learning_rate", "tokens", "step_time_s"]
        drawn = "document.querySelector(`[data-metric='${m}']`)"
        browser.wait_for(f"{metrics}.every(m => {drawn})", True)
        browser.wait_for(
            f"document.querySelector('#checkpoints').textContent.includes('{path}')", True
        )

        train(client, 2)  # the page polls: the chart grows without a reload
        browser.wait_for(CHART_POINTS, STEPS + 2)
        # The server view (every key's load over time, docs/operations.md) is drawn too.
        server_chart = "document.querySelector('#server-charts [data-metric=\"%s\"] polyline')"
        for name in ("train_tokens_per_s", "utilisation", "queued", "train_latency_p50_s"):
            browser.wait_for(f"!!{server_chart % name}", True)
        shot = tmp_path / "dashboard.png"
        browser.screenshot(shot)
    finally:
        browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("TINKERD_UPDATE_SCREENSHOT"):  # refresh the one in the README
        shutil.copy(shot, DOCS_SCREENSHOT)


def test_the_page_sends_security_headers(served):
    for path in ("/", "/static/dashboard.js", "/static/dashboard.css"):
        headers = httpx.get(served.url + path, timeout=30).headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        policy = headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy


def test_a_link_never_switches_a_tabs_key_without_asking(served):
    """A tab that uses Carol's key opens a link carrying Alice's: the key leaves the
    address bar, the tab keeps Carol's and asks; only "use the link's key" switches it.
    The page runs under its CSP (a violation would stop the script: the runs would not
    load)."""
    stored = "sessionStorage.getItem('tinkerd-api-key')"
    browser = Browser()
    try:
        browser.open(f"{served.url}/#key={CAROL}")  # a fresh tab takes a link's key
        browser.wait_for("document.getElementById('main').dataset.loaded", "true")
        assert browser.evaluate(stored) == CAROL
        browser.evaluate(f"location.hash = 'key={ALICE}'")
        browser.wait_for("document.getElementById('key-offer').hidden", False)
        assert browser.evaluate(stored) == CAROL and ALICE not in browser.evaluate("location.href")
        browser.evaluate("document.getElementById('keep-key').click()")
        assert browser.evaluate("document.getElementById('key-offer').hidden") is True
        assert browser.evaluate(stored) == CAROL
        browser.evaluate(f"location.hash = 'key={ALICE}'")
        browser.wait_for("document.getElementById('key-offer').hidden", False)
        browser.evaluate("document.getElementById('use-link-key').click()")
        assert browser.evaluate(stored) == ALICE
    finally:
        browser.close()


def test_a_step_folds_its_operations():
    """Gradient accumulation: two forward_backwards and an optim_step make one step."""
    rows = [
        (1, "forward_backward", 10.0, "loss", 2.0),
        (1, "forward_backward", 10.0, "sq/grad_norm:mean", 1.0),
        (1, "forward_backward", 10.0, "step_time_s", 0.25),
        (1, "forward_backward", 11.0, "loss", 3.0),
        (1, "forward_backward", 11.0, "sq/grad_norm:mean", 3.0),
        (1, "forward_backward", 11.0, "step_time_s", 0.25),
        (1, "optim_step", 12.0, "grad_norm", 5.0),
        (1, "optim_step", 12.0, "step_time_s", 0.5),
        (2, "forward_backward", 13.0, "loss", 1.0),
    ]
    assert per_step(rows) == [
        {"step": 1, "time": 12.0, "loss": 5.0, "sq/grad_norm:mean": 2.0}
        | {"step_time_s": 1.0, "grad_norm": 5.0},
        {"step": 2, "time": 13.0, "loss": 1.0},
    ]


def test_key_labels():
    assert split_key_label("tml-a=alice") == ("tml-a", "alice")
    assert split_key_label("tml-a") == ("tml-a", None)
    assert split_key_label("c2VjcmV0==") == ("c2VjcmV0==", None)  # base64 padding: all key
    assert split_key_label("tml-a=two words") == ("tml-a=two words", None)
