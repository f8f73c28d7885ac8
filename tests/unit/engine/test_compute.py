"""The engine's one compute path (`tinkerd.engine.compute`): a pass cut into micro-batches
(token budget, gradient accumulation) and float32 logprobs upcast a chunk at a time give
what one whole pass gives, to float rounding."""

import contextlib
import threading

import pytest
import torch
from helpers import TINY, make_datum

from tinkerd.engine import Engine, EngineConfig
from tinkerd.engine.compute import micro_batches
from tinkerd.engine.output_layer import target_logprobs
from tinkerd.engine.parallel import SingleProcess
from tinkerd.errors import InvalidRequestError
from tinkerd.types import AdamParams, Datum, LoraConfig, ModelInput

SMALL = EngineConfig(micro_batch_tokens=40, logits_chunk_tokens=7)


@pytest.fixture(scope="module")
def small():
    """An engine whose passes run 40 padded tokens at a time."""
    return Engine(config=SMALL)


def rl_datum(text: bytes, advantage: float) -> Datum:
    tokens = [256, *text]
    n = len(tokens) - 1
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [-5.0] * n,
            "advantages": [advantage] * n,
        },
    )


SFT = [
    make_datum([256, *b"hello world"]),
    make_datum([256, *b"abc"], [0.0, 1.0, 1.0]),
    make_datum([256, *b"tinkerd trains lora"]),
]
RL = [rl_datum(b"short", -0.5), rl_datum(b"a longer sequence of bytes", 1.0)]


def two_runs(engine: Engine) -> list[str]:
    return [engine.create_model(TINY, LoraConfig(rank=4, seed=s)) for s in (21, 22)]


def grads(engine: Engine, model_id: str) -> list[torch.Tensor]:
    return [p.grad.clone() for p in engine.run(model_id).params]


def same_grad(g: torch.Tensor, h: torch.Tensor) -> bool:
    """Equal to float rounding: the chunked output layer and micro-batches sum in another
    order, which moves an entry by ~1e-6 of the largest."""
    return torch.allclose(g, h, atol=1e-5 * max(1.0, g.abs().max().item()), rtol=1e-5)


def assert_same(a, b) -> None:
    assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
        assert torch.allclose(x["logprobs"].to_torch(), y["logprobs"].to_torch(), atol=1e-5)
        assert torch.allclose(
            x["elementwise_loss"].to_torch(), y["elementwise_loss"].to_torch(), atol=1e-5
        )


def test_micro_batched_packed_pass_equals_one_pass(engine, small):
    whole, cut = two_runs(engine), two_runs(small)
    outs = {}
    for e, (a, b) in ((engine, whole), (small, cut)):
        requests = [
            e.prepare(a, SFT, "cross_entropy", None),
            e.prepare(b, RL, "importance_sampling", None),
        ]
        outs[e] = e.run_losses(requests, backward=True)
    # The small engine really cut the pass: three forwards, each run's data split over
    # two of them, and the middle one packs rows of both runs.
    requests = [
        small.prepare(cut[0], SFT, "cross_entropy", None),
        small.prepare(cut[1], RL, "importance_sampling", None),
    ]
    members = small._members(requests, [small.run(m) for m in cut])
    groups = micro_batches(members, SMALL.micro_batch_tokens)
    assert [[(p.member, p.batch.lengths) for p in g] for g in groups] == [
        [(0, [11, 3])],
        [(0, [19]), (1, [5])],
        [(1, [26])],
    ]
    for x, y in zip(outs[engine], outs[small], strict=True):
        assert_same(x, y)
    for m, n in zip(whole, cut):
        for g, h in zip(grads(engine, m), grads(small, n), strict=True):
            assert same_grad(g, h)
    for e, ids in ((engine, whole), (small, cut)):
        for m in ids:
            e.unload_model(m)


def test_micro_batched_custom_loss_equals_one_pass(engine, small):
    def gradient_fn(logprobs):
        return [torch.full_like(lp, -(i + 1.0)) for i, lp in enumerate(logprobs)], "extra"

    results = {}
    for e in (engine, small):
        model_id = e.create_model(TINY, LoraConfig(rank=4, seed=23))
        out, extra = e.forward_backward_custom(model_id, SFT + RL, gradient_fn)
        assert extra == "extra"
        results[e] = (out, grads(e, model_id))
        e.unload_model(model_id)
    (out_a, g_a), (out_b, g_b) = results[engine], results[small]
    for x, y in zip(out_a.loss_fn_outputs, out_b.loss_fn_outputs, strict=True):
        assert torch.allclose(x["logprobs"].to_torch(), y["logprobs"].to_torch(), atol=1e-5)
    for g, h in zip(g_a, g_b, strict=True):  # float rounding: ~1e-6 of the largest
        assert same_grad(g, h)
    assert any(g.abs().sum() > 0 for g in g_a)  # lora_B's (lora_A's are 0 while B is 0)


def test_a_non_finite_request_in_a_micro_batched_pass_changes_nothing(engine, small):
    bad = Datum(
        model_input=ModelInput.from_ints([256, 1, 2]),
        loss_fn_inputs={
            "target_tokens": [1, 2, 3],
            "advantages": [1.0, 1.0, 1.0],
            "logprobs": [-1e30, 0.0, 0.0],  # the importance ratio overflows
        },
    )
    a, b = two_runs(small)
    results = small.run_losses(
        [
            small.prepare(a, [*RL, bad], "importance_sampling", None),
            small.prepare(b, SFT, "cross_entropy", None),
        ],
        backward=True,
    )
    assert isinstance(results[0], InvalidRequestError) and "no gradient" in str(results[0])
    assert all(p.grad is None for p in small.run(a).params)
    alone = engine.create_model(TINY, LoraConfig(rank=4, seed=22))
    engine.forward_backward(alone, SFT, "cross_entropy")
    for g, h in zip(grads(small, b), grads(engine, alone), strict=True):
        assert same_grad(g, h)
    for e, m in ((small, a), (small, b), (engine, alone)):
        e.unload_model(m)


@contextlib.contextmanager
def saved_float32_sizes():
    """Sizes of the float32 tensors autograd keeps for the backward within the block."""
    sizes: list[int] = []

    def pack(t):
        if t.dtype == torch.float32:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield sizes


@pytest.mark.parametrize("k", [None, 2])
def test_chunked_logprobs_equal_whole_and_keep_no_full_float32_block(k):
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(3, 6, vocab, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.arange(6) < torch.tensor([6, 2, 5])[:, None]
    n = int(mask.sum())
    targets = torch.randint(vocab, (n,) if k is None else (n, k))
    results = {}
    for chunk in (None, 4):
        logits.grad = None
        with saved_float32_sizes() as sizes:
            logprobs = target_logprobs(logits, mask, targets, chunk)
        logprobs.sum().backward()
        results[chunk] = (logprobs.detach(), logits.grad.clone())
        if chunk is None:  # the whole [n_tokens, vocab] float32 block is kept...
            assert max(sizes) >= n * vocab
        else:  # ...a chunked pass keeps no float32 logits (recomputed in the backward)
            assert max(sizes, default=0) < 4 * vocab
    assert torch.allclose(results[None][0], results[4][0], atol=1e-6)
    assert torch.allclose(results[None][1].float(), results[4][1].float(), atol=1e-6)


# ---------------------------------------------------------------- data parallel, in threads


class ThreadRank(SingleProcess):
    """Rank `rank` of ranks that are threads of this process: the same collectives as
    `TorchDistributed`, over shared slots and a barrier."""

    def __init__(self, rank: int, slots: list, barrier: threading.Barrier):
        self.rank, self.world, self.slots, self.barrier = rank, len(slots), slots, barrier

    def _exchange(self, obj):
        self.slots[self.rank] = obj
        self.barrier.wait()
        everything = list(self.slots)
        self.barrier.wait()
        return everything

    def all_finite(self, finite):
        return [all(column) for column in zip(*self._exchange(finite))]

    def gather(self, obj):
        everything = self._exchange(obj)
        return everything if self.rank == 0 else None

    def scatter(self, objs):
        return self._exchange(objs)[0][self.rank]

    def sum_gradients(self, params):
        everyone = self._exchange([p.grad for p in params])
        for k, p in enumerate(params):
            parts = [grads[k] for grads in everyone if grads[k] is not None]
            p.grad = torch.stack(parts).sum(0) if parts else None


def on_ranks(engines, fn):
    """fn(engine) on each engine at once, one thread per rank; their results."""
    results = [None] * len(engines)

    def work(r):
        results[r] = fn(engines[r])

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_ranks_pack_runs_and_train_like_one_process(engine):
    slots, barrier = [None, None], threading.Barrier(2)
    ranks = [Engine(parallel=ThreadRank(r, slots, barrier)) for r in range(2)]
    alone = two_runs(engine)
    ids = [two_runs(e) for e in ranks]  # not in threads: a run's seed is torch's global RNG
    adam = AdamParams(learning_rate=1e-2)

    def step(e, runs, backward=True):
        requests = [
            e.prepare(runs[0], SFT, "cross_entropy", None),
            e.prepare(runs[1], RL, "importance_sampling", None),
        ]
        outs = e.run_losses(requests, backward)
        if backward:
            for m in runs:
                e.optim_step(m, adam)
        return outs

    for _ in range(2):
        expected = step(engine, alone)
        got, nothing = on_ranks(ranks, lambda e: step(e, ids[ranks.index(e)]))
        assert nothing == [None, None]  # rank 1 hands back nothing
        for x, y in zip(got, expected, strict=True):
            assert_same(x, y)
    got, _ = on_ranks(ranks, lambda e: step(e, ids[ranks.index(e)], backward=False))
    for x, y in zip(got, step(engine, alone, backward=False), strict=True):
        assert_same(x, y)

    # A custom loss: rank 0 alone runs gradient_fn, on every rank's logprobs.
    def gradient_fn(logprobs):
        return [torch.full_like(lp, -(i + 1.0)) for i, lp in enumerate(logprobs)], len(logprobs)

    expected, n = engine.forward_backward_custom(alone[0], SFT + RL, gradient_fn)
    got, nothing = on_ranks(
        ranks,
        lambda e: e.forward_backward_custom(
            ids[ranks.index(e)][0], SFT + RL, gradient_fn if e is ranks[0] else None
        ),
    )
    assert nothing is None and got[1] == n == 5
    for x, y in zip(got[0].loss_fn_outputs, expected.loss_fn_outputs, strict=True):
        assert torch.allclose(x["logprobs"].to_torch(), y["logprobs"].to_torch(), atol=1e-5)
    summed = [a + b for a, b in zip(grads(ranks[0], ids[0][0]), grads(ranks[1], ids[1][0]))]
    for g, h in zip(summed, grads(engine, alone[0]), strict=True):
        # Summed in another order: float rounding, relative to the gradient's scale.
        assert (g - h).abs().max() <= 1e-5 * h.abs().max()
    for e, runs in ((engine, alone), *zip(ranks, ids)):
        for m in runs:
            e.unload_model(m)
