"""The output layer in chunks (`tinkerd.engine.output_layer`): logprobs and gradients equal
the whole-logits pass's to float rounding (LoRA'd unembedding, packed runs, custom losses,
Gemma's soft-capping), no `[tokens, vocab]` tensor is kept for the backward, and a pass of
any shape stays within the memory budget."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import TINY
from test_compute import RL, SFT, assert_same, grads, same_grad

from tinkerd.engine import Engine, EngineConfig
from tinkerd.engine.output_layer import output_layer, target_logprobs
from tinkerd.types import AdamParams, LoraConfig

WHOLE = EngineConfig(memory_budget_bytes=None)
CHUNKED = EngineConfig(memory_budget_bytes=None, logits_chunk_tokens=5)


def small_model(arch: str):
    """A random tiny `arch` causal LM (vocab 512)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"final_logit_softcapping": 3.0} if arch.startswith("gemma") else {}
    config = AutoConfig.for_model(
        arch,
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "mistral"])
def test_head_of_the_decoder_is_the_models_logits(arch):
    model = small_model(arch)
    layer = output_layer(model)
    assert layer is not None
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        split = layer.head(layer.decoder(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(split, whole)


def test_an_unusual_output_layer_falls_back_to_whole_logits():
    model = small_model("llama")
    model.config.final_logit_softcapping = None
    forward = type(model).forward

    def doubled(self, *args, **kwargs):  # a family whose logits are not head(decoder)
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 2
        return out

    vars(model)["forward"] = doubled.__get__(model)
    assert output_layer(model) is None


@pytest.mark.parametrize("k", [None, 3])
def test_chunked_head_equals_whole_and_keeps_no_logits(k):
    """Windows of 2 columns x 3 rows against one window: same logprobs and gradients
    (hidden states and the head's weight); only the windowed pass keeps no
    `[positions, vocab]` tensor for the backward."""
    torch.manual_seed(1)
    vocab, dim = 64, 8
    head = torch.nn.Linear(dim, vocab, bias=False)
    hidden = torch.randn(3, 7, dim, requires_grad=True)
    mask = torch.arange(7) < torch.tensor([7, 2, 5])[:, None]
    n = int(mask.sum())
    targets = torch.randint(vocab, (n,) if k is None else (n, k))
    results = {}
    for chunk in (None, 6):
        hidden.grad, head.weight.grad = None, None
        kept = []

        def pack(t, kept=kept):
            kept.append(t.dim() > 1 and t.shape[-1] == vocab and t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logprobs = target_logprobs(hidden, mask, targets, chunk, head)
        (logprobs * torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)).sum().backward()
        results[chunk] = (logprobs.detach(), hidden.grad.clone(), head.weight.grad.clone())
        biggest = max(kept)
        assert biggest >= n * vocab if chunk is None else biggest == 0
    for a, b in zip(results[None], results[6]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def engines():
    return Engine(config=WHOLE), Engine(config=CHUNKED)


def test_chunked_pass_equals_whole_with_a_lora_unembedding(engines):
    """Two runs packed in one pass (the unembedding LoRA'd, rows routed per run): outputs
    and every gradient as the whole-logits pass gives them."""
    ids = {}
    for e in engines:
        ids[e] = [e.create_model(TINY, LoraConfig(rank=4, seed=s)) for s in (41, 42)]
        for m in ids[e]:  # lora_B nonzero, so every gradient is
            e.forward_backward(m, SFT, "cross_entropy")
            e.optim_step(m, AdamParams(learning_rate=1e-2))
    outs = {}
    for e in engines:
        requests = [
            e.prepare(ids[e][0], SFT, "cross_entropy", None),
            e.prepare(ids[e][1], RL, "importance_sampling", None),
        ]
        outs[e] = e.run_losses(requests, backward=True)
    whole, chunked = engines
    assert any("lm_head" in n for n in whole.run(ids[whole][0]).adapter_state())
    for x, y in zip(outs[whole], outs[chunked], strict=True):
        assert_same(x, y)
    for m, n in zip(ids[whole], ids[chunked]):
        for g, h in zip(grads(whole, m), grads(chunked, n), strict=True):
            assert g.abs().sum() > 0
            assert same_grad(g, h)
    for e in engines:
        for m in ids[e]:
            e.unload_model(m)


def test_chunked_custom_loss_equals_whole(engines):
    def gradient_fn(logprobs):
        return [torch.full_like(lp, -(i + 1.0)) for i, lp in enumerate(logprobs)], None

    results = []
    for e in engines:
        model_id = e.create_model(TINY, LoraConfig(rank=4, seed=43))
        out, _ = e.forward_backward_custom(model_id, SFT + RL, gradient_fn)
        results.append((out, grads(e, model_id)))
        e.unload_model(model_id)
    (a, ga), (b, gb) = results
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
        torch.testing.assert_close(x["logprobs"].to_torch(), y["logprobs"].to_torch())
    for g, h in zip(ga, gb, strict=True):
        assert same_grad(g, h)


SWEEP = """
import ctypes, json, sys, tempfile, torch
from transformers import LlamaConfig, LlamaForCausalLM
from tinkerd.engine import Engine, EngineConfig
from tinkerd.engine.tiny import build_tokenizer
from tinkerd.types import Datum, LoraConfig, ModelInput
path = tempfile.mkdtemp()
torch.manual_seed(0)
config = LlamaConfig(vocab_size=16384, hidden_size=64, intermediate_size=160,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LlamaForCausalLM(config).save_pretrained(path)
build_tokenizer().save_pretrained(path)
budget = int(sys.argv[1])
engine = Engine(extra_models=[path], config=EngineConfig(memory_budget_bytes=budget))
model_id = engine.create_model(path, LoraConfig(rank=8, seed=1))
def data(rows, n):
    g = torch.Generator().manual_seed(rows * n)
    t = torch.randint(0, 16384, (rows, n + 1), generator=g)
    return [Datum(model_input=ModelInput.from_ints(r[:-1].tolist()),
                  loss_fn_inputs={"target_tokens": r[1:].tolist(), "weights": [1.0] * n})
            for r in t]
libc = ctypes.CDLL("libc.so.6")
engine.forward_backward(model_id, data(1, 16))
for rows, n in json.loads(sys.argv[2]):
    batch = data(rows, n)
    libc.malloc_trim(0)
    before = int(open("/proc/self/statm").read().split()[1]) * 4096
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here: this pass's peak
    engine.forward_backward(model_id, batch)
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps([rows, n, peak - before]), flush=True)
    del batch
"""


def test_every_batch_shape_stays_within_the_budget():
    """A vocabulary of 16k on a 64-wide model: whole logits take ~0.4 MB a token (~400 MB
    at 1024 tokens). Under a 64 MiB budget each shape, from one long row to many short
    ones, grows the process by at most the budget (plus allocator slack)."""
    budget = 64 << 20
    shapes = [[1, 1024], [4, 256], [32, 32], [128, 4]]
    out = subprocess.run(
        [sys.executable, "-c", SWEEP, str(budget), json.dumps(shapes)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    peaks = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert len(peaks) == len(shapes)
    for rows, n, extra in peaks:
        assert extra < budget + (8 << 20), (rows, n, extra / 2**20)
