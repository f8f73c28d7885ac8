"""External weights: `TrainingClient.save_weights_external` and
`RestClient.get_external_weights_urls` of the official SDK against `tinkerd serve`, and
tinker-cookbook's `weights.download` and merge-adapter script on what they give.

The downloaded adapter is checked against the server itself: PEFT on the base model, and
the merged model the cookbook's script writes, give the same per-token logprobs as the
run's own `forward`.
"""

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import tinker
import tinker_cookbook
import torch
from helpers import KEYS, TINY
from safetensors.torch import load_file
from tinker import types
from tinker_cookbook import weights

from tinkerd.engine.tiny import tiny_model_dir

ALICE, BOB = KEYS
PEFT_FILES = {"adapter_model.safetensors", "adapter_config.json"}
TOKENS = [256, *b"external weights"]


def sdk_datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


@pytest.fixture(scope="module")
def trained(server):
    """Alice's run after a few steps (so LoRA B is not zero), its external weights, and
    its per-token logprobs of TOKENS as the server computes them."""
    sdk = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    client = sdk.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
    data = [sdk_datum(TOKENS)]
    for _ in range(3):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=1e-2))
    path = client.save_weights_external("final").result().path
    state = client.save_state("state").result().path
    logprobs = client.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    yield client, path, state, torch.tensor(logprobs.tolist())
    sdk.close("success").result()


@pytest.fixture
def alice_env(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", ALICE)  # what weights.download authenticates with


def model_logprobs(model: torch.nn.Module) -> torch.Tensor:
    """Per-token logprobs of TOKENS[1:] given TOKENS[:-1] under a causal LM `[T-1]`."""
    ids = torch.tensor([TOKENS[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(TOKENS[1:])[:, None])[:, 0]


def test_save_weights_external_is_a_listed_external_checkpoint(server, trained):
    client, path, _, _ = trained
    assert path == f"tinker://{client.model_id}/external_weights/final"
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    listed = {c.tinker_path: c for c in rest.list_checkpoints(client.model_id).result().checkpoints}
    assert listed[path].checkpoint_type == "external"
    assert listed[path].checkpoint_id == "external_weights/final"
    assert listed[path].size_bytes > 0


def test_cookbook_downloads_a_peft_adapter_that_matches_the_server(
    server, trained, alice_env, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, path, _, served = trained
    out = weights.download(
        tinker_path=path, output_dir=str(tmp_path / "adapter"), base_url=server.url
    )
    assert {p.name for p in Path(out).iterdir()} == PEFT_FILES

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), torch_dtype=torch.float32)
    untrained = model_logprobs(base)
    adapted = PeftModel.from_pretrained(base, out)
    assert torch.allclose(model_logprobs(adapted), served, atol=1e-4)
    assert not torch.allclose(untrained, served, atol=1e-3)  # training moved it


def test_cookbook_merge_script_gives_the_server_s_model(server, trained, alice_env, tmp_path):
    from transformers import AutoModelForCausalLM

    _, path, _, served = trained
    adapter = weights.download(
        tinker_path=path, output_dir=str(tmp_path / "a"), base_url=server.url
    )
    script = Path(tinker_cookbook.__file__).parent / "scripts/merge_tinker_adapter_to_hf_model.py"
    merged = tmp_path / "merged"
    subprocess.run(
        [
            sys.executable,
            str(script),
            "--hf-model",
            str(tiny_model_dir()),
            "--tinker-adapter-path",
            adapter,
            "--output-path",
            str(merged),
        ],
        check=True,
        timeout=300,
    )
    model = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32)
    assert torch.allclose(model_logprobs(model), served, atol=1e-4)


def test_cookbook_downloads_a_training_checkpoint_through_an_encrypted_export(
    server, trained, alice_env, tmp_path
):
    """weights.download of tinker://.../weights/...: the cookbook loads the state into a new
    run, exports it age-encrypted with a TTL, downloads, decrypts, deletes the export."""
    client, path, state, _ = trained
    plain = weights.download(tinker_path=path, output_dir=str(tmp_path / "p"), base_url=server.url)
    via_state = weights.download(
        tinker_path=state, output_dir=str(tmp_path / "s"), base_url=server.url
    )
    assert {p.name for p in Path(via_state).iterdir()} == PEFT_FILES
    got = load_file(Path(via_state) / "adapter_model.safetensors")
    want = load_file(Path(plain) / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    left = [c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints]
    assert not [p for p in left if p.endswith("/external_weights/download")]  # cleaned up


def test_encrypted_export_serves_age_files_only_the_recipient_opens(server, trained):
    import pyrage  # a test requirement (requirements-cookbook.txt): the cookbook needs it

    client, _, _, _ = trained
    identity = pyrage.x25519.Identity.generate()
    path = (
        client.save_weights_external(
            "sealed", age_encryption_recipients=[str(identity.to_public())]
        )
        .result()
        .path
    )
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    urls = rest.get_external_weights_urls(path).result().urls
    assert set(urls) == {f + ".age" for f in PEFT_FILES}
    config = httpx.get(urls["adapter_config.json.age"]).content
    assert b'"peft_type"' not in config
    assert b'"peft_type"' in pyrage.decrypt(config, [identity])
    bad = client.save_weights_external("bad", age_encryption_recipients=["age1nope"])
    with pytest.raises(tinker.BadRequestError, match="age recipient"):
        bad.result()


def test_signed_urls_are_scoped_to_the_key_and_need_no_key(server, trained):
    client, path, _, _ = trained
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    response = rest.get_external_weights_urls(path).result()
    assert set(response.urls) == PEFT_FILES
    assert response.expires.timestamp() > time.time() + 60
    config = httpx.get(response.urls["adapter_config.json"])  # no API key
    assert config.status_code == 200 and config.json()["r"] == 4

    url = response.urls["adapter_model.safetensors"]
    for forged in (
        url.replace("signature=", "signature=0"),
        url.replace("adapter_model.safetensors", "tinkerd.json"),
        url.replace("expires=", "expires=9"),
    ):
        assert httpx.get(forged).status_code == 404, forged

    bob = tinker.RestClient(base_url=server.url, api_key=BOB)
    with pytest.raises(tinker.NotFoundError):
        bob.get_external_weights_urls(path).result()
    # Only external weights have per-file URLs.
    raw = httpx.get(
        f"{server.url}/api/v1/training_runs/{client.model_id}/checkpoints/weights/state"
        "/external_weights_urls",
        headers={"X-API-Key": ALICE},
    )
    assert raw.status_code == 400 and "external_weights" in raw.json()["detail"]
