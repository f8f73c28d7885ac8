"""LoRA per row (`tinkerd.engine.lora`): each row of one pass goes through its own adapter
(or none), in the Hugging Face forward and in the fast decode path's stacked products,
exactly as PEFT computes that adapter alone."""

import threading

import pytest
import torch
from helpers import TINY, make_datum

from tinkerd import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient
from tinkerd.client.transport import InProcessTransport
from tinkerd.engine import lora
from tinkerd.engine.lora import (
    BASE_ADAPTER,
    adapter_params,
    route_rows,
    segments,
    stacked_projection,
    trainable,
)
from tinkerd.types import LoraConfig


@pytest.fixture(scope="module")
def two_runs(engine):
    """Two runs of different ranks with nonzero (random) B, so that each changes logits."""
    ids = [
        engine.create_model(TINY, LoraConfig(rank=4, seed=1)),
        engine.create_model(TINY, LoraConfig(rank=8, seed=2, train_mlp=False)),
    ]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model_id in ids:
            for p in engine.run(model_id).params:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    yield ids
    for model_id in ids:
        engine.unload_model(model_id)


def test_segments_are_the_runs_of_equal_names():
    got = segments(["a", "a", BASE_ADAPTER, "b", "a"])
    assert [(s.adapter, s.start, s.end) for s in got] == [
        ("a", 0, 2),
        (BASE_ADAPTER, 2, 3),
        ("b", 3, 4),
        ("a", 4, 5),
    ]


def test_adapter_params_are_exactly_the_runs_parameters(engine, two_runs):
    for model_id in two_runs:
        run = engine.run(model_id)
        found = adapter_params(run.base.peft_model, model_id)
        assert {id(p) for p in found.values()} == {id(p) for p in run.params}
        assert found and all(f".{model_id}." in name for name in found)


def test_each_row_gets_what_its_adapter_alone_gives(engine, two_runs):
    a, b = two_runs
    base = engine.base_model(TINY)
    rows = [a, BASE_ADAPTER, b, a, b]
    ids = torch.randint(
        0, base.vocab_size, (len(rows), 7), generator=torch.Generator().manual_seed(1)
    )
    model, peft_model = base.peft_model.base_model.model, base.peft_model
    with base.lock, torch.no_grad():
        with route_rows(peft_model, segments(rows)):
            routed = model(input_ids=ids).logits
        alone = {}
        for name in (a, b):
            peft_model.set_adapter(name)
            alone[name] = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            alone[BASE_ADAPTER] = peft_model(input_ids=ids).logits
    for i, name in enumerate(rows):
        assert torch.allclose(routed[i], alone[name][i], atol=1e-5), (i, name)
        others = [n for n in alone if n != name]
        assert all(not torch.allclose(routed[i], alone[n][i], atol=1e-3) for n in others)


def test_stacked_projection_adds_what_the_routed_layer_adds(engine, two_runs):
    """The fast decode path's per-row product, from the same row->adapter list."""
    a, b = two_runs
    base = engine.base_model(TINY)
    layer = base.peft_model.base_model.model.model.layers[0].self_attn.q_proj
    rows = [b, a, BASE_ADAPTER, a]
    x = torch.randn(
        len(rows), layer.base_layer.in_features, generator=torch.Generator().manual_seed(2)
    )
    with base.lock, torch.no_grad():
        with route_rows(base.peft_model, segments(rows)):
            routed = layer(x) - layer.base_layer(x)
        stacked = stacked_projection([layer], rows, x.device).delta(x)
    assert torch.allclose(stacked, routed, atol=1e-6)
    assert torch.equal(routed[2], torch.zeros_like(routed[2]))  # the base row: no update
    assert not torch.allclose(routed[0], routed[1])


def test_another_runs_snapshots_sampling_and_training_leave_a_run_unchanged(engine):
    """A run trained while another run saves sampler weights, samples from them and trains
    on the samples (as tinker-cookbook's rl_loop beside sl_loop: shared base, shared
    lane, packed passes, frozen adapters added mid-run) follows the same trajectory as
    when trained alone, saves included."""
    service = ServiceClient(transport=InProcessTransport(engine=engine))
    pattern = [256, *b"abcdefgh"]
    data = [make_datum(pattern * 3) for _ in range(4)]

    def train(client) -> list[float]:
        losses = []
        for step in range(6):
            if step == 3:
                client.save_state("mid").result()
                client.save_weights_for_sampler("mid").result()
            fb = client.forward_backward(data, "cross_entropy")
            client.optim_step(AdamParams(learning_rate=3e-3))
            losses.append(fb.result().metrics["loss:sum"])
        return losses

    alone = train(service.create_lora_training_client(TINY, rank=8, seed=11))
    stop = threading.Event()

    def other(client) -> None:
        while not stop.is_set():
            sampler = client.save_weights_and_get_sampling_client()
            out = sampler.sample(ModelInput.from_ints(pattern[:4]), 4, SamplingParams(max_tokens=6))
            rows = []
            for seq in out.result().sequences:
                tokens = [*pattern[:4], *seq.tokens]
                inputs = {
                    "target_tokens": tokens[1:],
                    "logprobs": [0.0] * 3 + seq.logprobs,
                    "advantages": [1.0] * (len(tokens) - 1),
                }
                rows.append(
                    Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)
                )
            client.forward_backward(rows, "importance_sampling")
            client.optim_step(AdamParams(learning_rate=1e-3)).result()

    thread = threading.Thread(
        target=other, args=(service.create_lora_training_client(TINY, rank=8, seed=12),)
    )
    thread.start()
    try:
        beside = train(service.create_lora_training_client(TINY, rank=8, seed=11))
    finally:
        stop.set()
        thread.join()
    assert alone[-1] < 0.7 * alone[0], alone  # it learns: the comparison means something
    assert beside == pytest.approx(alone, rel=1e-4)  # packing may change float rounding


@pytest.mark.parametrize("mixed", [False, True], ids=["one scaling", "mixed scalings"])
def test_batched_rows_give_each_adapters_logits_and_gradients(engine, mixed):
    """Segments tiling the rows equally through adapters of one shape take the batched
    path (`lora._batched_forward`: the scaling on the rank-sized product, the update
    added by `baddbmm`): each row's logits, and each adapter's gradient, are PEFT's for
    that adapter alone. Rank 3 makes the scaling 32/3 (not a power of two, so its
    rounding shows); `mixed` gives the middle adapter another (as a loaded adapter of
    another alpha would have)."""
    ids = [engine.create_model(TINY, LoraConfig(rank=3, seed=s)) for s in (21, 22, 23)]
    base = engine.base_model(TINY)
    peft_model, model = base.peft_model, base.peft_model.base_model.model
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for model_id in ids:
            for p in engine.run(model_id).params:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    layers = [m for m in lora.lora_layers(peft_model) if ids[1] in m.scaling]
    if mixed:
        for layer in layers:
            layer.scaling[ids[1]] = 1.7
    rows = [ids[0], ids[0], ids[1], ids[1], ids[2], ids[2]]
    tokens = torch.randint(0, base.vocab_size, (len(rows), 9), generator=gen)
    weights = torch.randn(len(rows), 9, base.vocab_size, generator=gen)
    params = [p for m in ids for p in engine.run(m).params]

    def grads(of: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        out = [p.grad.clone() for p in of]
        for p in params:
            p.grad = None
        return out

    try:
        with base.lock:
            segs = segments(rows)
            assert lora._uniform(layers[0], segs, len(rows))  # the batched path
            for m in ids:
                trainable(engine.run(m).params)
            with route_rows(peft_model, segs):
                routed = model(input_ids=tokens).logits
            (routed * weights).sum().backward()
            together = grads(params)
            alone = []
            for k, m in enumerate(ids):
                peft_model.set_adapter(m)
                trainable(engine.run(m).params)
                part = slice(2 * k, 2 * k + 2)
                logits = peft_model(input_ids=tokens[part]).logits
                assert torch.allclose(routed[part], logits, atol=1e-5), k
                (logits * weights[part]).sum().backward()
                alone += grads(engine.run(m).params)
    finally:
        if mixed:
            for layer in layers:
                layer.scaling[ids[1]] = 32 / 3
    assert len(together) == len(alone) == len(params)
    for g, h in zip(together, alone):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-5 * float(h.abs().max()))
