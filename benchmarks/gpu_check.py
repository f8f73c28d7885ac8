"""GPU check (issue 26): tinkerd's training and sampling at the sizes users run, on one GPU.

For a ~1.2B Llama-3-shaped model (Llama 3.2 1B's config) and a ~2B Qwen3-shaped one
(Qwen3-1.7B's config), random-initialised from those configs (no hub, no download),
bfloat16 base weights, LoRA rank 32 on every linear layer (the unembedding included,
tinkerd's default), each model in a process of its own (forked, so the GPU starts empty and
the engine's default memory budget is computed afresh), it prints:

- MFU of one training step (forward_backward + optim_step) of 8 x 2048 tokens;
- peak GPU memory of one step of 8 x 4096 tokens, against the engine's memory budget;
- K = 16 runs packed into one pass against one pass per run (2 x 128 tokens a run);
- sampler tokens/s at 64 concurrent sequences (64 requests of one sample, 128 new tokens
  each, prompts of 16-32 tokens) against Hugging Face `generate` on the same weights;
- the sampler's logprobs of the tokens it sampled against the trainer's (a forward of the
  same sequences), in bfloat16, through an adapter trained for three steps.

MFU is the step's model FLOPs over its time, against the GPU's datasheet bf16 dense peak
(and, beside it, the best torch.matmul of 8192^3 measured in the same process). Model
FLOPs of a LoRA step (`multi_tenant.step_flops`): the frozen base needs its forward
(2 N T) and the gradient of its inputs (2 N T) but no weight gradient: 4 N T for the N
weights of its matmuls (the tied unembedding counted, the embedding lookup not); attention
scores and values 4 T s d per layer forward, three times that with the backward, halved
for causality; 6 N_lora T for the adapter. Recomputation (checkpointed layers, the output
layer's windows) is not counted: it is work the method spends, not model FLOPs.

`--cpu`: the same code paths on tiny configs of both families (a few seconds; run by
`tests/unit/test_gpu_check.py`, so the check cannot rot without a GPU to run it on).
Exit status 1 if any part failed (each part's error is printed and the others still run).

On a GPU machine that has PyTorch, transformers, PEFT and Triton but not tinkerd:
`benchmarks/gpu_check.sh` here builds a wheel folder (tinkerd's wheel, the wheels of what
it needs beyond those, this script and the benchmark modules it uses; ~17 MiB) and prints
the one command to run there: `gpu_check.py --install SITE` installs from the folder what
that Python lacks (no index, no resolver: the machine's own packages stay), then the check
runs with PYTHONPATH=SITE.

    python benchmarks/gpu_check.py [--cpu] [--models llama-1b,qwen3-1.7b] [--out DIR]
    python benchmarks/gpu_check.py --pack DIR [--python-version 3.12]  # gpu_check.sh
    python DIR/gpu_check.py --install SITE  # on the GPU machine, before the check
    python benchmarks/gpu_check.py --from-json FILE [--record]  # its figures, into the docs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LLAMA_3_2_1B = dict(  # meta-llama/Llama-3.2-1B's config.json
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    tie_word_embeddings=True,
)
QWEN3_1_7B = dict(  # Qwen/Qwen3-1.7B's config.json
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)
TINY_LLAMA3_ROPE = {**LLAMA_3_2_1B["rope_scaling"], "original_max_position_embeddings": 128}
MODELS = {  # name: (model_type, full config, --cpu config)
    "llama-1b": ("llama", LLAMA_3_2_1B, {**LLAMA_3_2_1B, **TINY, "rope_scaling": TINY_LLAMA3_ROPE}),
    "qwen3-1.7b": ("qwen3", QWEN3_1_7B, {**QWEN3_1_7B, **TINY}),
}
DATASHEET_BF16 = [  # (name contains, dense bf16 FLOP/s), first match wins
    ("H200", 989.4e12),
    ("H100 PCIe", 756.5e12),
    ("H100", 989.4e12),  # SXM (HBM3)
    ("A100", 312e12),
    ("L40S", 362e12),
]
GPU_HAS = (
    *("torch", "triton", "transformers", "peft"),
    # and what any release of those that tinkerd accepts requires
    *("numpy", "safetensors", "tokenizers", "huggingface-hub", "hf-xet", "pyyaml", "regex"),
    *("packaging", "filelock", "fsspec", "jinja2", "markupsafe", "networkx", "sympy"),
    *("mpmath", "setuptools", "psutil", "accelerate", "tqdm"),
)
"""On the GPU machine already; tinkerd's other requirements travel as wheels."""
CARRIED = ("gpu_check.py", "multi_tenant.py", "sampling.py", "_report.py")
"""The benchmark modules the check runs, copied into the wheel folder."""


@dataclass(frozen=True)
class Sizes:
    """What each part computes (full: on a GPU; --cpu: tiny)."""

    rank: int = 32
    mfu_batch: int = 8
    mfu_seq: int = 2048
    mfu_steps: int = 3
    memory_batch: int = 8
    memory_seq: int = 4096
    packed_runs: int = 16
    packed_batch: int = 2
    packed_seq: int = 128
    packed_rounds: int = 3
    packed_steps: int = 2
    sequences: int = 64
    new_tokens: int = 128
    sample_rounds: int = 3
    agree_sequences: int = 8
    agree_tokens: int = 64
    peak_n: int = 8192


CPU_SIZES = Sizes(
    mfu_batch=2,
    mfu_seq=32,
    mfu_steps=1,
    memory_batch=2,
    memory_seq=64,
    packed_runs=4,
    packed_batch=1,
    packed_seq=16,
    packed_rounds=1,
    packed_steps=1,
    sequences=4,
    new_tokens=8,
    sample_rounds=1,
    agree_sequences=2,
    agree_tokens=8,
    peak_n=256,
)
PARTS = ("mfu", "memory", "packed", "sampler", "agreement")


# ---------------------------------------------------------------- one model (a child)


def build_model(name: str, cpu: bool, out: Path, device: str) -> str:
    """A random-initialised bf16 model of `name`'s config (with the tiny model's byte
    tokenizer: token ids are all the check needs), saved as a Hugging Face directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tinkerd.engine.tiny import build_tokenizer

    hf_logging.disable_progress_bar()
    model_type, full, tiny = MODELS[name]
    config = AutoConfig.for_model(model_type, **(tiny if cpu else full))
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for 2B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    del model
    return str(out)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak bytes since `reset`: allocated GPU memory, or the process's RSS (VmHWM)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def reset(self) -> int:
        """Resets the peak; returns the bytes in use now."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
        return self._status("VmRSS")

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0


def micro_batch_rows(limits, rows: int, seq: int) -> int:
    """Rows of `seq` tokens in one micro-batch of a pass of `rows` such rows under
    `limits` (`compute.Limits`, as `Engine.pass_limits` gives them)."""
    if limits.micro_batch_rows:
        rows = min(rows, limits.micro_batch_rows)
    if limits.micro_batch_tokens:
        rows = min(rows, max(1, limits.micro_batch_tokens // seq))
    return rows


def plan_of(limits, rows: int, seq: int) -> dict:
    """How a pass of `rows` x `seq` tokens runs: micro-batches, logits window, checkpointing."""
    at_once = micro_batch_rows(limits, rows, seq)
    return dict(
        micro_batches=math.ceil(rows / at_once),
        micro_batch_rows=at_once,
        logits_chunk=limits.logits_chunk_tokens,
        checkpoint=limits.checkpoint,
    )


def train_step(engine, model_id: str, data, device: str) -> float:
    """Seconds of one forward_backward + optim_step."""
    from multi_tenant import ADAM

    sync(device)
    start = time.perf_counter()
    engine.forward_backward(model_id, data, "cross_entropy")
    engine.optim_step(model_id, ADAM)
    sync(device)
    return time.perf_counter() - start


def part_mfu(engine, model: str, sizes: Sizes, device: str) -> dict:
    import torch
    from multi_tenant import batch_data, matmul_peak, step_flops

    from tinkerd.types import LoraConfig

    base = engine.base_model(model)
    model_id = engine.create_model(model, LoraConfig(rank=sizes.rank, seed=0))
    data = batch_data(base.vocab_size, sizes.mfu_batch, sizes.mfu_seq, seed=0)
    plan = plan_of(engine.pass_limits(model_id, data), sizes.mfu_batch, sizes.mfu_seq)
    train_step(engine, model_id, data, device)  # warm-up (the optimizer state made)
    seconds = statistics.median(
        train_step(engine, model_id, data, device) for _ in range(sizes.mfu_steps)
    )
    flops = step_flops(engine, model, model_id, sizes.mfu_batch, sizes.mfu_seq)
    lora = sum(p.numel() for p in engine.run(model_id).params)
    engine.unload_model(model_id)
    measured = matmul_peak(device, torch.bfloat16, sizes.peak_n)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else ""
    datasheet = next((peak for key, peak in DATASHEET_BF16 if key in name), None)
    achieved = flops / seconds
    return dict(
        tokens=sizes.mfu_batch * sizes.mfu_seq,
        shape=f"{sizes.mfu_batch}x{sizes.mfu_seq}",
        base_params=sum(p.numel() for n, p in base.model.named_parameters() if "lora_" not in n),
        lora_params=lora,
        seconds=seconds,
        flops=flops,
        achieved=achieved,
        datasheet_peak=datasheet,
        measured_peak=measured,
        mfu=achieved / datasheet if datasheet else None,
        mfu_measured=achieved / measured,
        plan=plan,
    )


def part_memory(engine, model: str, sizes: Sizes, device: str) -> dict:
    from multi_tenant import batch_data

    from tinkerd.types import LoraConfig

    base = engine.base_model(model)
    model_id = engine.create_model(model, LoraConfig(rank=sizes.rank, seed=0))
    data = batch_data(base.vocab_size, sizes.memory_batch, sizes.memory_seq, seed=1)
    plan = plan_of(engine.pass_limits(model_id, data), sizes.memory_batch, sizes.memory_seq)
    probe = PeakMemory(device)
    before = probe.reset()
    seconds = train_step(engine, model_id, data, device)
    peak = probe.peak()
    engine.unload_model(model_id)
    return dict(
        shape=f"{sizes.memory_batch}x{sizes.memory_seq}",
        budget=engine.limits.memory_budget_bytes,
        before=before,
        peak=peak,
        seconds=seconds,
        plan=plan,
    )


def part_packed(engine, model: str, sizes: Sizes, device: str) -> dict:
    from multi_tenant import throughput

    args = SimpleNamespace(
        rank=sizes.rank,
        batch=sizes.packed_batch,
        seq=sizes.packed_seq,
        rounds=sizes.packed_rounds,
        steps=sizes.packed_steps,
        device=device,
    )
    rates = throughput(engine, model, args, sizes.packed_runs)  # (tokens/s, per CPU s)
    alone, packed = rates["one at a time"][0], rates["batched"][0]
    return dict(
        runs=sizes.packed_runs,
        shape=f"{sizes.packed_batch}x{sizes.packed_seq}",
        alone=alone,
        packed=packed,
        ratio=packed / alone,
    )


def part_sampler(engine, model: str, sizes: Sizes, device: str) -> dict:
    import torch
    from sampling import hf_decode, load_hf, make_prompts, tinkerd_decode

    from tinkerd.engine.fast_decode import unsupported_reason

    base = engine.base_model(model)
    prompts = make_prompts(sizes.sequences)
    weights = engine.sampler_for(base_model=model)
    hf = load_hf(model, torch.bfloat16, device)
    pad = base.tokenizer.pad_token_id or 0
    decoders = {
        "hf": hf_decode(hf, prompts, sizes.new_tokens, pad),
        "tinkerd": tinkerd_decode(engine, weights, prompts, 1, sizes.new_tokens),
    }
    expected = sizes.sequences * sizes.new_tokens
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    for round_ in range(sizes.sample_rounds + 1):  # the first is a warm-up
        for name, decode in decoders.items():
            sync(device)
            start = time.perf_counter()
            produced = decode()
            sync(device)
            assert produced == expected, f"{name} decoded {produced} tokens, not {expected}"
            if round_:
                rates[name].append(produced / (time.perf_counter() - start))
    del hf
    hf_rate, ours = (statistics.median(rates[name]) for name in ("hf", "tinkerd"))
    return dict(
        sequences=sizes.sequences,
        new_tokens=sizes.new_tokens,
        hf=hf_rate,
        tinkerd=ours,
        ratio=ours / hf_rate,
        fast_decode=unsupported_reason(base.model) or "yes",
    )


def part_agreement(engine, model: str, sizes: Sizes, device: str) -> dict:
    from multi_tenant import batch_data
    from sampling import make_prompts

    from tinkerd.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams

    base = engine.base_model(model)
    model_id = engine.create_model(model, LoraConfig(rank=sizes.rank, seed=0))
    train = batch_data(base.vocab_size, 1, 64, seed=2)
    for _ in range(3):  # an adapter that is not the identity
        engine.forward_backward(model_id, train, "cross_entropy")
        engine.optim_step(model_id, AdamParams(learning_rate=1e-3))
    weights = engine.save_weights_for_sampler(model_id, "gpu-check")
    params = SamplingParams(max_tokens=sizes.agree_tokens, temperature=1.0, stop=[], seed=0)
    prompts = make_prompts(sizes.agree_sequences, seed=3)
    futures = [engine.sample(weights, p, 1, params) for p in prompts]
    gaps = []
    for prompt, future in zip(prompts, futures):
        sequence = future.result().sequences[0]
        tokens = prompt + sequence.tokens
        datum = Datum(
            model_input=ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        out = engine.forward(model_id, [datum], "cross_entropy")
        trained = out.loss_fn_outputs[0]["logprobs"].data[len(prompt) - 1 :]
        gaps += [abs(a - b) for a, b in zip(trained, sequence.logprobs, strict=True)]
    engine.unload_model(model_id)
    return dict(
        tokens=len(gaps),
        max_gap=max(gaps),
        mean_gap=statistics.fmean(gaps),
        over_0_1=sum(g > 0.1 for g in gaps),
    )


def check_model(
    name: str, cpu: bool, sizes: Sizes, deadline: float, parts: list[str], tf32: bool = False
) -> dict:
    """`parts` on one model, in this process; a part that fails is reported and the next
    one runs; parts that would start after `deadline` (time.time()) are skipped."""
    import torch
    import transformers

    from tinkerd.engine import Engine, EngineConfig

    # tinkerd adapts the tied unembedding (train_unembed), which PEFT warns about per run
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
    device = "cpu" if cpu else "cuda"
    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --cpu for the CPU rehearsal)")
    # LoRA runs in float32 beside the bf16 base: TF32 tensor cores for it, if asked for
    torch.backends.cuda.matmul.allow_tf32 = tf32
    result: dict = {"model": name, "device": device, "tf32": tf32}
    result["gpu"] = torch.cuda.get_device_name() if not cpu else "none (--cpu)"
    result["versions"] = f"torch {torch.__version__}, transformers {transformers.__version__}"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        start = time.perf_counter()
        model = build_model(name, cpu, Path(tmp) / name, device)
        # runs of both packing modes stay resident: paging is not what is measured here
        config = EngineConfig(dtype="bfloat16", run_budget_bytes=None, max_resident_runs=None)
        engine = Engine(device=device, data_dir=Path(tmp) / "data", config=config)
        engine.base_model(model)
        result["setup_seconds"] = time.perf_counter() - start
        for part in parts:
            fn = globals()[f"part_{part}"]
            if time.time() > deadline:
                result[part] = {"error": "skipped: the check's time was spent"}
                continue
            start = time.perf_counter()
            try:
                result[part] = fn(engine, model, sizes, device)
            except Exception:  # noqa: BLE001 -- reported; the other parts still run
                result[part] = {"error": traceback.format_exc(limit=-4)}
            result[part]["wall_seconds"] = time.perf_counter() - start
            print(f"[{name}] {part}: {json.dumps(result[part], default=str)}", flush=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return result


def _child(conn, *args) -> None:
    """`check_model(*args)` in a child process, its result sent back on `conn`."""
    name = args[0]
    try:
        conn.send(check_model(*args))
    except Exception:  # noqa: BLE001 -- the parent reports it
        conn.send({"model": name, "error": traceback.format_exc(limit=-4)})
    conn.close()


def run_checks(
    models: list[str],
    cpu: bool,
    sizes: Sizes,
    seconds: float,
    parts: list[str],
    start: str,
    tf32: bool = False,
) -> list[dict]:
    """Each model in a child process of its own, started by `start`: `spawn` on a GPU (a
    fresh interpreter, whatever CUDA state this one has), `fork` on the CPU (the modules
    imported here once, not again per model)."""
    if start == "fork":
        import multi_tenant  # noqa: F401 -- imported once here, before the forks
        import sampling  # noqa: F401

        from tinkerd.engine import engine  # noqa: F401

    context = multiprocessing.get_context(start)
    deadline = time.time() + seconds
    results = []
    for name in models:
        mine, theirs = context.Pipe(duplex=False)
        child = context.Process(
            target=_child, args=(theirs, name, cpu, sizes, deadline, parts, tf32)
        )
        child.start()
        theirs.close()
        try:
            results.append(mine.recv())
        except EOFError:
            results.append({"model": name, "error": "the child process died"})
        child.join()
        if child.exitcode:
            results[-1].setdefault("error", f"the child process exited with {child.exitcode}")
    return results


def failures(results: list[dict]) -> list[str]:
    """`model part: error` for every part (or model) that failed."""
    out = []
    for r in results:
        if "error" in r:
            out.append(f"{r['model']}: {r['error']}")
        out += [f"{r['model']} {p}: {r[p]['error']}" for p in PARTS if "error" in r.get(p, {})]
    return out


# ---------------------------------------------------------------- the report


def render(results: list[dict], cpu: bool) -> str:
    """The figures as markdown tables."""

    def rows(part: str, cells) -> list[str]:
        out = []
        for r in results:
            got = r.get(part, {"error": r.get("error", "not run")})
            if part not in r and "error" not in r:
                continue  # not asked for
            if "error" in got:
                out.append(f"| {r['model']} | failed: {got['error'].strip().splitlines()[-1]} |")
            else:
                out.append("| " + " | ".join([r["model"], *cells(got)]) + " |")
        return out

    def plan(p: dict) -> str:
        n, rows = p["micro_batches"], p["micro_batch_rows"]
        cut = f"{n} micro-batch{'es' if n > 1 else ''} of {rows} row{'s' if rows > 1 else ''}"
        ckpt = "checkpointing" if p["checkpoint"] else "no checkpointing"
        return f"{cut}, {ckpt}, logits window {p['logits_chunk']}"

    def tflops(x: float | None) -> str:
        return "-" if x is None else f"{x / 1e12:,.1f}"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"**{x:.0%}**"

    gib = 1 << 30
    first = results[0] if results else {}
    lines = [
        f"Device: {first.get('gpu', '?')}; {first.get('versions', '')}. "
        + ("Tiny configs on the CPU (--cpu): the figures only show the code runs." if cpu else ""),
        "",
        "Training step (forward_backward + optim_step), bf16 base, LoRA rank 32 on every linear"
        + (" (float32, TF32 matmuls on):" if first.get("tf32") else " (float32):"),
        "",
        "| model | base params | LoRA params | tokens | plan | s/step | model TFLOP/step | "
        "TFLOP/s | MFU (datasheet) | MFU (measured matmul) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows(
            "mfu",
            lambda m: [
                f"{m['base_params'] / 1e9:.2f}B",
                f"{m['lora_params'] / 1e6:.1f}M",
                m["shape"],
                plan(m["plan"]),
                f"{m['seconds']:.3f}",
                f"{m['flops'] / 1e12:,.1f}",
                tflops(m["achieved"]),
                pct(m["mfu"]) + f" of {tflops(m['datasheet_peak'])}",
                f"{m['mfu_measured']:.0%} of {tflops(m['measured_peak'])}",
            ],
        ),
        "",
        "Peak memory of one step (GPU memory allocated; on the CPU, the process's RSS):",
        "",
        "| model | tokens | budget GiB | before GiB | peak GiB | step's growth GiB | plan | s |",
        "|---|---|---|---|---|---|---|---|",
        *rows(
            "memory",
            lambda m: [
                m["shape"],
                f"{(m['budget'] or 0) / gib:.1f}",
                f"{m['before'] / gib:.2f}",
                f"{m['peak'] / gib:.2f}",
                f"{(m['peak'] - m['before']) / gib:.2f}",
                plan(m["plan"]),
                f"{m['seconds']:.2f}",
            ],
        ),
        "",
        "Runs packed into one pass against one pass per run (tokens/s, all runs together):",
        "",
        "| model | runs | tokens a run | one at a time | packed | packed / one at a time |",
        "|---|---|---|---|---|---|",
        *rows(
            "packed",
            lambda m: [
                str(m["runs"]),
                m["shape"],
                f"{m['alone']:,.0f}",
                f"{m['packed']:,.0f}",
                f"**{m['ratio']:.2f}**",
            ],
        ),
        "",
        "Sampling, concurrent sequences of one sample each (generated tokens/s, prefill included):",
        "",
        "| model | sequences | new tokens | HF generate | tinkerd | tinkerd / HF | fast decode |",
        "|---|---|---|---|---|---|---|",
        *rows(
            "sampler",
            lambda m: [
                str(m["sequences"]),
                str(m["new_tokens"]),
                f"{m['hf']:,.0f}",
                f"{m['tinkerd']:,.0f}",
                f"**{m['ratio']:.2f}**",
                m["fast_decode"],
            ],
        ),
        "",
        "Sampler against trainer: logprobs of the sampled tokens (bf16, a trained adapter):",
        "",
        "| model | tokens | max gap (nats) | mean gap | tokens over 0.1 |",
        "|---|---|---|---|---|",
        *rows(
            "agreement",
            lambda m: [
                str(m["tokens"]),
                f"{m['max_gap']:.4f}",
                f"{m['mean_gap']:.5f}",
                str(m["over_0_1"]),
            ],
        ),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- the wheel folder


def carried_requirements(wheel: Path, python_version: str) -> dict[str, str | None]:
    """What tinkerd's wheel requires, directly or not, short of `GPU_HAS` (not followed
    into): canonical name -> the version installed here (None: not installed here).
    Markers are evaluated for CPython `python_version` on Linux; extras are not followed."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = wheel_requires(wheel)
    env = {"python_version": python_version, "python_full_version": python_version + ".0"}
    env |= {"sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    found: dict[str, str | None] = {}
    while todo:
        req = Requirement(todo.pop())
        name = canonicalize_name(req.name)
        if name in found or name in GPU_HAS or name.startswith("nvidia-"):
            continue
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # (an `extra == ...` marker never holds with extra "")
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = None
            continue
        found[name] = dist.version
        todo += dist.requires or []
    return found


def wheel_requires(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def wheels_to_install(folder: Path) -> list[Path]:
    """The wheels of `folder` (those this Python can install) whose distribution it lacks,
    or has at a version that a requirement of some wheel there excludes. No resolver: the
    machine's own packages stay as they are (and so does whatever they require)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename

    supported = set(sys_tags())
    wheels = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, _, _, tags = parse_wheel_filename(wheel.name)
        if tags & supported:
            wheels[canonicalize_name(name)] = wheel
    wanted: dict[str, list] = {}
    for wheel in wheels.values():
        for req in map(Requirement, wheel_requires(wheel)):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                wanted.setdefault(canonicalize_name(req.name), []).append(req.specifier)
    chosen = []
    for name, wheel in wheels.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            chosen.append(wheel)
            continue
        if not all(spec.contains(have, prereleases=True) for spec in wanted.get(name, [])):
            chosen.append(wheel)
    for name in GPU_HAS:  # not carried: say so if the machine's will not do
        for spec in wanted.get(name, []):
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                have = None
            if have is None or not spec.contains(have, prereleases=True):
                print(f"warning: {name} {have or 'missing'}, tinkerd wants {spec}", file=sys.stderr)
    return chosen


def install(folder: Path, site: Path) -> None:
    """Install into `site` (`pip --target`, no index, no dependencies resolved) the wheels
    of `folder` that this Python needs (`wheels_to_install`); run with PYTHONPATH=site."""
    chosen = wheels_to_install(folder)
    print(f"installing into {site}: {', '.join(w.name.split('-')[0] for w in chosen)}")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    subprocess.run([*pip, "--target", str(site), *map(str, chosen)], check=True)


def pack(out: Path, python_version: str) -> str:
    """The wheel folder for a GPU machine: tinkerd's wheel, the wheels of everything it
    needs beyond `GPU_HAS` (for CPython `python_version` on x86-64 Linux, the versions
    installed here), and the benchmark modules the check runs. Returns the command to run
    there, from the folder's parent (`install`, then the check)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    repo = HERE.parent
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(repo)],
        check=True,
    )
    shutil.rmtree(repo / "build", ignore_errors=True)  # setuptools' scratch space
    (wheel,) = out.glob("tinkerd-*.whl")
    needed = carried_requirements(wheel, python_version)
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(17, 40)]
    platforms += ["manylinux2014_x86_64", "manylinux1_x86_64"]
    subprocess.run(
        [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out)]
        + ["--python-version", python_version, "--implementation", "cp"]
        + [arg for p in platforms for arg in ("--platform", p)]
        + [f"{n}=={v}" if v else n for n, v in sorted(needed.items())],
        check=True,
    )
    for name in CARRIED:
        shutil.copy2(HERE / name, out / name)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {len(list(out.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB", file=sys.stderr)
    return (
        f"python3 {out}/gpu_check.py --install /tmp/site && PYTHONPATH=/tmp/site "
        f"PYTHONUNBUFFERED=1 python3 {out}/gpu_check.py --out ${{OUT:-.}}"
    )


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny configs on the CPU")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--parts", default=",".join(PARTS), help=", ".join(PARTS))
    parser.add_argument("--seconds", type=float, default=420, help="start no part after this")
    parser.add_argument("--start", choices=["fork", "spawn"], help="default: spawn on a GPU")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls (the fp32 LoRA)")
    parser.add_argument("--out", help="write gpu_check.json and gpu_check.md here")
    parser.add_argument("--pack", type=Path, help="build the wheel folder here, print the command")
    parser.add_argument(
        "--install",
        type=Path,
        help="install what this Python lacks from the wheels beside this file into this folder",
    )
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's (--pack)")
    parser.add_argument("--from-json", type=Path, help="render a run's gpu_check.json")
    parser.add_argument("--record", action="store_true", help="into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.install:
        install(HERE, args.install)
        return 0
    if args.pack:
        print(pack(args.pack, args.python_version))
        return 0
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results, cpu = saved["results"], saved["cpu"]
    else:
        sizes = CPU_SIZES if args.cpu else Sizes()
        started = time.perf_counter()
        parts = args.parts.split(",")
        start = args.start or ("fork" if args.cpu else "spawn")
        models = args.models.split(",")
        results = run_checks(models, args.cpu, sizes, args.seconds, parts, start, args.tf32)
        saved = {"cpu": args.cpu, "sizes": asdict(sizes), "results": results}
        saved["seconds"] = time.perf_counter() - started
        cpu = args.cpu
    report = render(results, cpu)
    if "seconds" in saved:
        report += f"\n\nThe whole check took {saved['seconds']:.0f} s."
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(saved, indent=1, default=str))
        (out / "gpu_check.md").write_text(report + "\n")
    if args.record:
        from _report import record

        first = results[0]
        on = f"{first.get('gpu', '?')}; {first.get('versions', '')}"
        record(f"gpu_check ({first.get('gpu', '?')})", report, on=on)
    failed = failures(results)
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
