"""`tinkerd runs|checkpoints|export` against a real server and on a local data dir."""

import json

import pytest
import torch
from helpers import KEYS, TINY, make_datum

from tinkerd import AdamParams, ServiceClient
from tinkerd.cli import main
from tinkerd.client.transport import InProcessTransport
from tinkerd.engine.models import resolve_model_path
from tinkerd.types import LoraConfig

ALICE, BOB = KEYS


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def trained(service: ServiceClient, name: str) -> tuple[str, str]:
    """A run trained a few steps (so its LoRA is not zero) and saved: (model_id, path)."""
    client = service.create_lora_training_client(TINY, rank=4, seed=3)
    data = [make_datum([256, *b"merge me"]), make_datum([256, *b"into the base"])]
    for _ in range(3):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(AdamParams(learning_rate=2e-2))
    return client.model_id, client.save_state(name).result().path


def test_cli_against_a_server(server, capsys, tmp_path, monkeypatch):
    service = ServiceClient(base_url=server.url, api_key=ALICE)
    run, path = trained(service, "cli-state")
    monkeypatch.setenv("TINKERD_BASE_URL", server.url)  # the CLI's defaults come from env
    monkeypatch.setenv("TINKER_API_KEY", ALICE)

    code, out, _ = cli(capsys, "runs", "list")
    assert code == 0 and run in out and "BASE MODEL" in out
    code, out, _ = cli(capsys, "checkpoints", "list", "--run", run)
    assert code == 0 and path in out and "training" in out
    code, out, _ = cli(capsys, "checkpoints", "list", "--json")
    assert code == 0 and path in {c["tinker_path"] for c in json.loads(out)}

    code, out, _ = cli(capsys, "checkpoints", "download", path, "-o", str(tmp_path / "dl"))
    on_disk = server.data_dir / "checkpoints" / run / "weights" / "cli-state"
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(
        p.name for p in on_disk.iterdir()
    )
    assert all((tmp_path / "dl" / p.name).read_bytes() == p.read_bytes() for p in on_disk.iterdir())

    # Bob's key: sees none of it, deletes nothing.
    code, out, _ = cli(capsys, "checkpoints", "list", "--api-key", BOB)
    assert code == 0 and path not in out
    code, _, err = cli(capsys, "checkpoints", "delete", path, "--api-key", BOB)
    assert code == 1 and "no checkpoint" in err
    assert on_disk.exists()

    code, out, _ = cli(capsys, "export", path, "--merged", str(tmp_path / "merged"))
    assert code == 0, out
    check_merged(tmp_path / "dl", tmp_path / "merged")

    code, out, _ = cli(capsys, "checkpoints", "delete", path)
    assert code == 0 and not on_disk.exists()
    code, _, err = cli(capsys, "checkpoints", "delete", path)
    assert code == 1 and err.startswith("error: no checkpoint")
    service.close()


def check_merged(adapter_dir, merged_dir) -> None:
    """The merged model loads with plain transformers, its logits equal base + PEFT
    adapter's, and it generates."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = torch.tensor([[256, *tokenizer.encode("merge me", add_special_tokens=False)]])
    with torch.no_grad():
        expected, got = peft(ids).logits, merged(ids).logits
        plain = peft.get_base_model()  # the LoRA did change something
        with peft.disable_adapter():
            assert (plain(ids).logits - expected).abs().max() > 1e-3
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    generated = merged.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)


def test_cli_on_a_local_data_dir(engine, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TINKERD_BASE_URL", raising=False)
    service = ServiceClient(transport=InProcessTransport(engine=engine))
    run, path = trained(service, "cli-local")
    data_dir = str(engine.data_dir)

    code, out, _ = cli(capsys, "runs", "list", "--data-dir", data_dir, "--json")
    assert code == 0 and run in {r["training_run_id"] for r in json.loads(out)}
    code, out, _ = cli(capsys, "checkpoints", "list", "--run", run, "--data-dir", data_dir)
    assert code == 0 and path in out
    code, out, _ = cli(capsys, "checkpoints", "publish", path, "--data-dir", data_dir)
    assert code == 0
    code, out, _ = cli(
        capsys, "checkpoints", "list", "--run", run, "--data-dir", data_dir, "--json"
    )
    assert json.loads(out)[0]["public"] is True
    out_dir = tmp_path / "local-dl"
    code, _, _ = cli(
        capsys, "checkpoints", "download", path, "-o", str(out_dir), "--data-dir", data_dir
    )
    assert code == 0 and (out_dir / "adapter_model.safetensors").exists()
    code, out, _ = cli(
        capsys, "export", path, "--merged", str(tmp_path / "m"), "--data-dir", data_dir
    )
    assert code == 0 and (tmp_path / "m" / "config.json").exists()
    code, _, err = cli(
        capsys, "export", path, "--merged", str(tmp_path / "m"), "--data-dir", data_dir
    )
    assert code == 1 and "not an empty directory" in err
    code, out, _ = cli(
        capsys, "export", path, "--untied-base", str(tmp_path / "b"), "--data-dir", data_dir
    )
    assert code == 0 and "no tied lm_head" in out and (tmp_path / "b" / "config.json").exists()
    code, _, _ = cli(capsys, "checkpoints", "delete", path, "--data-dir", data_dir)
    assert code == 0
    code, out, _ = cli(capsys, "checkpoints", "list", "--run", run, "--data-dir", data_dir)
    assert path not in out
    code, _, err = cli(capsys, "runs", "list", "--data-dir", str(tmp_path / "typo"))
    assert code == 1 and "no tinkerd data directory" in err and not (tmp_path / "typo").exists()
    with pytest.raises(SystemExit):  # a subcommand is required
        main(["checkpoints"])
    service.close()


def test_export_of_a_renamed_base_uses_the_serve_mapping(capsys, tmp_path, monkeypatch):
    """A run on `serve --model NAME=SOURCE`'s NAME exports through that mapping (or
    --base); NAME alone is looked up as a hub id, and offline that fails clearly."""
    from tinkerd.engine import Engine

    monkeypatch.delenv("TINKERD_BASE_URL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "my-org/renamed-tiny"
    engine = Engine(extra_models=[f"{name}={TINY}"], data_dir=tmp_path / "data")
    model_id = engine.create_model(name, LoraConfig(rank=4, seed=3))
    engine.forward_backward(model_id, [make_datum([256, *b"merge me"])])
    engine.optim_step(model_id, AdamParams(learning_rate=2e-2))
    path = engine.save_state(model_id, "renamed").tinker_path
    data_dir = str(engine.data_dir)
    common = ["--data-dir", data_dir]
    code, _, err = cli(capsys, "export", path, "--merged", str(tmp_path / "a"), *common)
    assert code == 1 and f"--model {name}=SOURCE" in err
    code, out, _ = cli(
        capsys,
        "export",
        path,
        "--merged",
        str(tmp_path / "b"),
        "--model",
        f"{name}={TINY}",
        *common,
    )
    assert code == 0 and TINY in out
    dl = tmp_path / "dl"
    assert cli(capsys, "checkpoints", "download", path, "-o", str(dl), *common)[0] == 0
    check_merged(dl, tmp_path / "b")
    code, _, _ = cli(
        capsys, "export", path, "--merged", str(tmp_path / "c"), "--base", TINY, *common
    )
    assert code == 0 and (tmp_path / "c" / "config.json").exists()
