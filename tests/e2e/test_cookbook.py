"""tinker-cookbook's minimal recipes, as the cookbook ships them, against `tinkerd serve`.

`tinker_cookbook.recipes.sl_loop` and `rl_loop` (tinker-cookbook 0.6.1, installed by
scripts/test.sh) run as subprocesses with only their command-line config set: the base
URL, the key (TINKER_API_KEY), the model name and bounded sizes. The server serves the
built-in chat model `tinkerd/tiny-chat` under the Llama 3 instruct name the recipes'
renderer lookup knows (`--model meta-llama/Llama-3.1-8B-Instruct=tinkerd/tiny-chat`).

Nothing is downloaded: the recipes load their data sets and tokenizer by hub id, and the
working directory they run in holds local directories of those names (the `datasets` and
`transformers` loaders take a local directory before the hub): small data sets in the
real ones' schemas, and the tiny chat model's tokenizer.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import KEYS, ServerProcess

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SUFFIX = " Provide a numerical answer without units, written inside \\boxed{}."


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_workdir(root: Path) -> Path:
    """Local stand-ins for HuggingFaceH4/no_robots, openai/gsm8k (config `main`) and the
    model's tokenizer, under the names the recipes load them by."""
    from tinkerd.engine.tiny_chat import build_chat_tokenizer

    rng = random.Random(0)
    pairs = [(rng.randint(1, 4), rng.randint(1, 4)) for _ in range(64)]
    no_robots = [
        {
            "prompt": f"What is {a} plus {b}?",
            "prompt_id": str(i),
            "messages": [
                {"role": "user", "content": f"What is {a} plus {b}?{SUFFIX}"},
                {"role": "assistant", "content": f"\\boxed{{{a + b}}}"},
            ],
            "category": "Math",
        }
        for i, (a, b) in enumerate(pairs)
    ]
    _write_jsonl(root / "HuggingFaceH4/no_robots/data/train.jsonl", no_robots)
    _write_jsonl(root / "HuggingFaceH4/no_robots/data/test.jsonl", no_robots[:8])
    _write_jsonl(
        root / "openai/gsm8k/main/train.jsonl",
        [
            {
                "question": f"What is {a} plus {b}?",
                "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>\n#### {a + b}",
            }
            for a, b in pairs[:8]
        ],
    )
    (root / "openai/gsm8k/README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n"
        "  - split: train\n    path: main/train.jsonl\n---\n"
    )
    build_chat_tokenizer().save_pretrained(root / MODEL)
    return root


SL_CONFIG = dict(batch_size=8, learning_rate=3e-3, save_every=4)  # 64 conversations: 8 steps
# stable_reinforce, rl_loop's default loss, is not public (docs/compatibility.md);
# importance_sampling is one of the recipe's own choices.
RL_CONFIG = dict(
    batch_size=2, group_size=4, max_tokens=16, max_steps=2, save_every=1,
    loss_fn="importance_sampling",
)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One server; both recipes started at once (they share it, and their start-up)."""
    import tinker_cookbook  # noqa: F401  a test requirement (scripts/test.sh), never skipped

    workdir = make_workdir(tmp_path_factory.mktemp("cookbook"))
    server = ServerProcess(
        tmp_path_factory.mktemp("cookbook-server"), "--model", f"{MODEL}=tinkerd/tiny-chat"
    )
    procs = {
        "sl_loop": start_recipe("sl_loop", workdir, server, **SL_CONFIG),
        "rl_loop": start_recipe("rl_loop", workdir, server, **RL_CONFIG),
    }
    yield server, workdir, procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
    server.stop()


def start_recipe(module: str, workdir: Path, server: ServerProcess, **config):
    """`python -m tinker_cookbook.recipes.<module> key=value ...` in `workdir`, output to
    `workdir/<module>.out`, logs (metrics.jsonl, checkpoints.jsonl) in `workdir/<module>`."""
    config = {"base_url": server.url, "model_name": MODEL, "log_path": workdir / module, **config}
    env = {
        **os.environ,
        "TINKER_API_KEY": KEYS[0],
        "HF_HOME": str(workdir / ".hf"),  # the data sets' arrow cache stays in the test
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", f"tinker_cookbook.recipes.{module}"]
        + [f"{k}={v}" for k, v in config.items()],
        cwd=workdir,
        env=env,
        stdout=open(workdir / f"{module}.out", "w"),
        stderr=subprocess.STDOUT,
    )


def finish(runs, module: str) -> Path:
    """Wait for a recipe to end; it must succeed. Returns its log_path."""
    _, workdir, procs = runs
    returncode = procs[module].wait(timeout=300)
    assert returncode == 0, (workdir / f"{module}.out").read_text()[-8000:]
    return workdir / module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_checkpoints(log_path: Path, server: ServerProcess, expect_names: list[str]) -> dict:
    """The recipe's checkpoints.jsonl names server checkpoints that exist and load."""
    import tinker

    records = read_jsonl(log_path / "checkpoints.jsonl")
    assert [r["name"] for r in records] == expect_names
    final = records[-1]
    assert final["state_path"].startswith("tinker://") and "/weights/" in final["state_path"]
    assert "/sampler_weights/" in final["sampler_path"]
    service = tinker.ServiceClient(base_url=server.url, api_key=KEYS[0])
    rest = tinker.RestClient(base_url=server.url, api_key=KEYS[0])
    for record in records:
        info = rest.get_weights_info_by_tinker_path(record["state_path"]).result()
        assert info.base_model == MODEL and info.is_lora
    # The final state restores with its optimizer, and the sampler weights sample.
    restored = service.create_training_client_from_state_with_optimizer(
        final["state_path"]
    ).result()
    assert restored.get_info().model_data.model_name == MODEL
    sampler = service.create_sampling_client(model_path=final["sampler_path"]).result()
    prompt = tinker.ModelInput.from_ints(restored.get_tokenizer().encode("Hi"))
    out = sampler.sample(prompt, 1, tinker.SamplingParams(max_tokens=4)).result()
    assert len(out.sequences[0].tokens) >= 1
    return {"service": service, "restored": restored}


def test_sl_loop_loss_falls_and_saves_checkpoints(runs):
    log_path = finish(runs, "sl_loop")
    metrics = read_jsonl(log_path / "metrics.jsonl")
    assert len(metrics) == 8  # 64 conversations, batches of 8, one epoch
    # The recipe's own step numbers: optim_step's metrics have no `step` to clobber them.
    assert [m["step"] for m in metrics] == list(range(8))
    nll = [m["train_mean_nll"] for m in metrics]
    assert sum(nll[-3:]) / 3 < 0.7 * sum(nll[:3]) / 3, nll
    assert all(m["num_sequences"] == 8 for m in metrics)
    check_checkpoints(log_path, runs[0], ["000004", "final"])


def test_rl_loop_computes_rewards_and_saves_checkpoints(runs):
    import tinker

    log_path = finish(runs, "rl_loop")
    metrics = read_jsonl(log_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1]
    # The reward is the recipe's GSM8K grader on the sampled, parsed responses.
    assert all(0.0 <= m["reward/total"] <= 1.0 for m in metrics)
    clients = check_checkpoints(log_path, runs[0], ["000001", "final"])
    # A run the recipe would train with stable_reinforce is refused by name, not guessed.
    restored = clients["restored"]
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([256, 258, 97]),
        loss_fn_inputs={
            "target_tokens": [258, 97, 259],
            "logprobs": [0.0, 0.0, 0.0],
            "advantages": [1.0, 1.0, 1.0],
        },
    )
    with pytest.raises(tinker.BadRequestError, match="stable_reinforce"):
        restored.forward_backward([datum], "stable_reinforce").result()
