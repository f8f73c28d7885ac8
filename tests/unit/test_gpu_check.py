"""benchmarks/gpu_check.py: its --cpu rehearsal runs every part of the GPU check (so the
check cannot rot on a project whose CI has no GPU), and its wheel folder is complete."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402

pytestmark = pytest.mark.timeout(600)  # the rehearsal's fixture, on a shared machine


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """The check as a user runs it, `--cpu`, in a fresh process: (exit status, results).
    About 12 s of CPU (user + system); the wall-clock limit allows for a shared machine."""
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    saved = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.md").read_text().startswith("Device: none (--cpu)")
    return done, saved


def test_cpu_rehearsal_runs_every_part_of_both_models(cpu_run):
    done, saved = cpu_run
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["model"]: r for r in saved["results"]}
    assert set(results) == {"llama-1b", "qwen3-1.7b"}
    sizes = gpu_check.CPU_SIZES
    for r in results.values():
        assert gpu_check.failures([r]) == []
        assert set(gpu_check.PARTS) <= set(r)
        assert r["mfu"]["seconds"] > 0 and r["mfu"]["mfu_measured"] > 0
        assert r["memory"]["peak"] >= r["memory"]["before"] > 0
        assert r["packed"]["runs"] == sizes.packed_runs and r["packed"]["ratio"] > 0
        assert r["sampler"]["hf"] > 0 and r["sampler"]["tinkerd"] > 0
        agreement = r["agreement"]
        assert agreement["tokens"] == sizes.agree_sequences * sizes.agree_tokens
        assert agreement["max_gap"] < 0.02  # bf16 on the CPU: the same matmuls both ways
    assert results["llama-1b"]["sampler"]["fast_decode"] == "yes"


def test_model_flops_are_the_stated_formula(cpu_run):
    """The tiny Llama's step FLOPs by hand: its matmul weights (4 heads of 16, 2 of them
    for keys and values; MLP 128; two layers; the unembedding, tied, counted once), times
    4 T; attention 3 x 4 T s d L / 2; 6 T per adapter weight."""
    _, saved = cpu_run
    mfu = next(r["mfu"] for r in saved["results"] if r["model"] == "llama-1b")
    hidden, heads, kv, mlp, layers, vocab = 64, 64, 32, 128, 2, 512
    per_layer = hidden * heads * 2 + hidden * kv * 2 + 3 * hidden * mlp
    weights = layers * per_layer + vocab * hidden
    batch, seq = gpu_check.CPU_SIZES.mfu_batch, gpu_check.CPU_SIZES.mfu_seq
    tokens = batch * seq
    # rank 32 on q, k, v, o, gate, up, down and the unembedding: r (in + out) each
    lora = 32 * (layers * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3) + (64 + vocab))
    assert mfu["lora_params"] == lora
    attention = 3 * 4 * tokens * seq * heads * layers / 2
    assert mfu["flops"] == 4 * weights * tokens + attention + 6 * lora * tokens


def test_a_failed_part_is_reported_and_fails_the_check():
    results = [
        {"model": "m", "gpu": "none", "versions": "", "mfu": {"error": "Traceback\nBoom: x"}},
        {"model": "n", "error": "the child process died"},
    ]
    assert gpu_check.failures(results) == ["m mfu: Traceback\nBoom: x", "n: the child process died"]
    text = gpu_check.render(results, cpu=True)
    assert "| m | failed: Boom: x |" in text and "| n | failed: the child process died |" in text


def test_the_wheel_folder_carries_what_the_gpu_machine_lacks(tmp_path):
    """From tinkerd's requirements: pydantic and everything it needs; never torch,
    transformers, PEFT or what they bring (numpy, safetensors...)."""
    wheel = tmp_path / "tinkerd-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(
            "tinkerd-0.1.0.dist-info/METADATA",
            "Name: tinkerd\nRequires-Dist: torch>=2.4\nRequires-Dist: transformers\n"
            "Requires-Dist: numpy\nRequires-Dist: pydantic<3,>=2.7\n"
            'Requires-Dist: pytest; extra == "dev"\n',
        )
    carried = gpu_check.carried_requirements(wheel, "3.12")
    assert {"pydantic", "pydantic-core", "annotated-types", "typing-extensions"} <= set(carried)
    assert not {"torch", "transformers", "numpy", "pytest"} & set(carried)
    assert carried["pydantic"] is not None  # pinned to the version tested here


def fake_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        lines = [f"Name: {name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {r}" for r in requires]
        z.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
    return wheel


def test_install_takes_only_what_this_python_lacks_or_has_too_old(tmp_path):
    """A distribution this Python lacks is installed; one it has is kept unless a carried
    wheel requires a version it is not; a wheel for another Python is never taken."""
    absent = fake_wheel(tmp_path, "tinkerd_absent_probe", "1.0", ["pytest>=1", "pydantic>=999"])
    fake_wheel(tmp_path, "pytest", "999.0")  # installed here, and its version will do
    newer = fake_wheel(tmp_path, "pydantic", "999.0")  # installed here, but too old for absent
    (tmp_path / "other-1.0-cp27-cp27mu-manylinux1_x86_64.whl").write_bytes(b"")
    assert gpu_check.wheels_to_install(tmp_path) == [newer, absent]
