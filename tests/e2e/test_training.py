"""Training behaviour through the public client API, on every transport."""

import asyncio
import math
import threading

import pytest
from helpers import KEYS, TINY, gspo_case, make_datum

from tinkerd import AdamParams, Datum, ModelInput, ServiceClient, TensorData
from tinkerd.client.transport import InProcessTransport
from tinkerd.errors import InvalidRequestError, ModelUnloadedError

ADAM = AdamParams(learning_rate=3e-3)


def new_run(service, seed=0, **kwargs):
    return service.create_lora_training_client(TINY, rank=8, seed=seed, **kwargs)


def train(client, batch, steps, adam=ADAM):
    """Pipelined loop; returns the loss of each step."""
    out = []
    for _ in range(steps):
        fb = client.forward_backward(batch, "cross_entropy")
        client.optim_step(adam)
        out.append(fb.result().metrics["loss:sum"])
    return out


def logprobs(client, batch):
    return [o["logprobs"].tolist() for o in client.forward(batch).result().loss_fn_outputs]


def test_loss_falls_on_a_fixed_batch(service, batch):
    losses = train(new_run(service), batch, 12)
    assert losses[-1] < 0.3 * losses[0], losses


def test_cross_entropy_is_the_weighted_sum_of_returned_logprobs(service):
    data = [make_datum([256, *b"weights"], [1.0, -0.5, 0.0, 2.0, 0.25, 1.0, 3.0])]
    out = new_run(service).forward(data).result()
    lps = out.loss_fn_outputs[0]["logprobs"].tolist()
    weights = data[0].loss_fn_inputs["weights"].tolist()
    assert len(lps) == 7 and all(lp < 0 for lp in lps)
    expected = sum(-w * lp for w, lp in zip(weights, lps))
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    elementwise = out.loss_fn_outputs[0]["elementwise_loss"].tolist()
    assert elementwise == pytest.approx([-w * lp for w, lp in zip(weights, lps)], rel=1e-5)


def test_padding_changes_nothing(service, batch):
    client = new_run(service)
    together = logprobs(client, batch)
    alone = [logprobs(client, [d])[0] for d in batch]
    for a, b in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-5)
    # The gradient of the batch equals the sum of the per-datum gradients.
    whole = new_run(service)
    whole.forward_backward(batch).result()
    norm_whole = whole.optim_step(ADAM).result().metrics["grad_norm"]
    parts = new_run(service)
    for d in batch:
        parts.forward_backward([d])
    norm_parts = parts.optim_step(ADAM).result().metrics["grad_norm"]
    assert norm_parts == pytest.approx(norm_whole, rel=1e-4)
    assert logprobs(whole, batch)[0] == pytest.approx(logprobs(parts, batch)[0], abs=1e-4)


def test_runs_on_one_base_do_not_affect_each_other(service, batch):
    a, b = new_run(service, seed=3), new_run(service, seed=3)
    b_before = logprobs(b, batch)
    train(a, batch, 3)
    assert logprobs(b, batch) == b_before  # exactly: b's adapter was never touched
    assert logprobs(a, batch) != b_before
    # Interleaved gradients stay separate: a's step sees only a's gradient.
    reference = new_run(service, seed=5)
    reference.forward_backward(batch[:1])
    expected = reference.optim_step(ADAM).result().metrics["grad_norm"]
    c, d = new_run(service, seed=5), new_run(service, seed=5)
    c.forward_backward(batch[:1])
    d.forward_backward(batch)
    assert c.optim_step(ADAM).result().metrics["grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_same_seed_same_run_different_seed_different_run(service, batch):
    assert train(new_run(service, seed=7), batch, 3) == train(new_run(service, seed=7), batch, 3)
    assert train(new_run(service, seed=8), batch, 3) != train(new_run(service, seed=7), batch, 3)


def test_pipelined_requests_run_in_submission_order(service, batch):
    sequential = new_run(service, seed=11)
    expected = []
    for _ in range(3):
        expected.append(sequential.forward_backward(batch).result().metrics["loss:sum"])
        sequential.optim_step(ADAM).result()
    piped = new_run(service, seed=11)
    futures = []
    for _ in range(3):  # nothing waited on until everything is queued
        futures.append(piped.forward_backward(batch))
        futures.append(piped.optim_step(ADAM))
    assert [f.result().metrics["loss:sum"] for f in futures[::2]] == expected


def test_several_clients_train_at_once(service, batch):
    expected = train(new_run(service, seed=13), batch, 3)
    results = {}

    def worker(i):
        results[i] = train(new_run(service, seed=13), batch, 3)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Concurrent runs share packed passes: the same results up to float rounding.
    assert all(results[i] == pytest.approx(expected, rel=1e-5) for i in range(3))


def test_async_api_pipelines(service, batch):
    async def main():
        client = await service.create_lora_training_client_async(TINY, rank=8, seed=17)
        fb = await client.forward_backward_async(batch, "cross_entropy")
        step = await client.optim_step_async(ADAM)
        fb_out, step_out = await fb, await step.result_async(timeout=60)
        info = await client.get_info_async()
        return fb_out, step_out, info

    fb_out, step_out, info = asyncio.run(main())
    assert fb_out.metrics["loss:sum"] > 0
    assert step_out.metrics["optim/step"] == 1.0
    assert info.lora_rank == 8 and info.model_data.model_name == TINY


def test_rl_losses_at_ratio_one_have_the_policy_gradient(service):
    """With sampling logprobs == current logprobs (ratio 1, inside any clip), the gradient of
    importance_sampling, ppo, cispo and dro w.r.t. each logprob is -A: the same as
    cross_entropy with weights A. Their losses follow from the hand formulas."""
    base = make_datum([256, *b"advantage"])
    advantages = [1.0, -0.5, 2.0, 0.0, 1.5, -1.0, 0.5, 1.0, -2.0]
    probe = new_run(service, seed=21)
    lps = logprobs(probe, [base])[0]
    rl = Datum(
        model_input=base.model_input,
        loss_fn_inputs={
            "target_tokens": base.loss_fn_inputs["target_tokens"],
            "logprobs": lps,
            "advantages": advantages,
        },
    )
    ce = make_datum([256, *b"advantage"], advantages)
    norms, loss_sums = {}, {}
    for name, data in [
        ("cross_entropy", ce),
        ("importance_sampling", rl),
        ("ppo", rl),
        ("cispo", rl),
        ("dro", rl),
    ]:
        client = new_run(service, seed=21)
        loss_sums[name] = client.forward_backward([data], name).result().metrics["loss:sum"]
        norms[name] = client.optim_step(ADAM).result().metrics["grad_norm"]
    for name in norms:
        assert norms[name] == pytest.approx(norms["cross_entropy"], rel=1e-4), name
    a_sum = sum(advantages)
    assert loss_sums["importance_sampling"] == pytest.approx(-a_sum, abs=1e-4)
    assert loss_sums["ppo"] == pytest.approx(-a_sum, abs=1e-4)
    a_lp = sum(a * lp for a, lp in zip(advantages, lps))
    assert loss_sums["cispo"] == pytest.approx(-a_lp, abs=1e-4)
    assert loss_sums["dro"] == pytest.approx(-a_lp, abs=1e-4)


def test_gspo_takes_one_clipped_ratio_per_sequence(service):
    """gspo (GSPO-token): every token of a sequence carries the sequence's ratio (exp of the
    mean log-ratio over sequence_ratio_mask) with its own logprob's gradient, clipped to
    [0.8, 1.2]: loss and gradient follow the hand computation of helpers.gspo_case."""
    bases = [make_datum([256, *b"gspo one"]), make_datum([256, *b"and two"])]
    lps = logprobs(new_run(service, seed=22), bases)
    inputs, loss_sum, weights = gspo_case(lps)
    data = [
        Datum(
            model_input=b.model_input,
            loss_fn_inputs={
                "target_tokens": b.loss_fn_inputs["target_tokens"],
                "logprobs": i["logprobs"],
                "advantages": i["advantages"],
                "sequence_ratio_mask": i["mask"],
            },
        )
        for b, i in zip(bases, inputs)
    ]
    client = new_run(service, seed=22)
    assert client.forward_backward(data, "gspo").result().metrics["loss:sum"] == pytest.approx(
        loss_sum, abs=1e-4
    )
    norm = client.optim_step(ADAM).result().metrics["grad_norm"]
    ce = [make_datum(list(b.model_input.to_ints()) + [0], w) for b, w in zip(bases, weights)]
    for d, b in zip(ce, bases):  # same inputs and targets, weights from the hand computation
        d.loss_fn_inputs["target_tokens"] = b.loss_fn_inputs["target_tokens"]
    reference = new_run(service, seed=22)
    reference.forward_backward(ce, "cross_entropy").result()
    assert norm == pytest.approx(reference.optim_step(ADAM).result().metrics["grad_norm"], rel=1e-4)


def test_cross_entropy_with_several_targets_per_position(service):
    """2-D target_tokens `[seq_len, k]` (e.g. top-k distillation): loss = -sum w * logprob."""
    tokens = [256, *b"abcd"]
    single = make_datum(tokens)
    second = [[t, 120] for t in tokens[1:]]
    weights = [[0.75, 0.25]] * 4
    multi = Datum(
        model_input=single.model_input, loss_fn_inputs={"target_tokens": second, "weights": weights}
    )
    client = new_run(service, seed=1)
    lp1 = logprobs(client, [single])[0]
    out = client.forward([multi]).result()
    lp2 = out.loss_fn_outputs[0]["logprobs"].tolist()
    assert [row[0] for row in lp2] == pytest.approx(lp1, abs=1e-5)
    expected = -sum(0.75 * a + 0.25 * b for a, b in lp2)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)


def _bad_inputs():
    good = make_datum([256, *b"fine"])
    tokens = good.model_input.to_ints()

    def datum(**inputs):
        return Datum(
            model_input=ModelInput.from_ints(tokens),
            loss_fn_inputs={**good.loss_fn_inputs, **inputs},
        )

    return [
        (
            "length",
            [datum(target_tokens=[1, 2])],
            "cross_entropy",
            None,
            "target_tokens has length 2 but model_input has 4",
        ),
        (
            "oov target",
            [datum(target_tokens=[1, 2, 3, 99999])],
            "cross_entropy",
            None,
            "outside the vocabulary",
        ),
        (
            "oov input",
            [
                Datum(
                    model_input=ModelInput.from_ints([1, 2, 3, 5000]),
                    loss_fn_inputs=good.loss_fn_inputs,
                )
            ],
            "cross_entropy",
            None,
            "token id 5000 is outside the vocabulary",
        ),
        (
            "nan weights",
            [datum(weights=[1.0, math.nan, 1.0, 1.0])],
            "cross_entropy",
            None,
            "contains NaN or inf",
        ),
        ("unknown loss", [good], "mse", None, "unknown loss_fn 'mse'"),
        ("missing inputs", [good], "importance_sampling", None, "needs loss_fn_inputs"),
        (
            "missing target",
            [Datum(model_input=good.model_input, loss_fn_inputs={"weights": [1.0] * 4})],
            "cross_entropy",
            None,
            "needs loss_fn_inputs \\['target_tokens'\\]",
        ),
        ("unknown config", [good], "cross_entropy", {"beta": 1.0}, "not used by"),
        ("empty", [], "cross_entropy", None, "data is empty"),
        (
            "float targets",
            [datum(target_tokens=TensorData(data=[1.0, 2.0, 3.0, 4.0], dtype="float32"))],
            "cross_entropy",
            None,
            "must be int64",
        ),
        ("not data", "hello", "cross_entropy", None, "list of Datum"),
    ]


def test_bad_input_fails_clearly_and_leaves_the_run_usable(service, batch):
    client = new_run(service, seed=31)
    for label, data, loss_fn, config, message in _bad_inputs():
        for method in (client.forward, client.forward_backward):
            with pytest.raises(InvalidRequestError, match=message):
                method(data, loss_fn, config).result()
        assert label
    with pytest.raises(InvalidRequestError, match="learning_rate"):
        client.optim_step(AdamParams(learning_rate=-1.0)).result()
    # Nothing leaked: the run trains exactly like a fresh one with the same seed.
    assert train(client, batch, 2) == train(new_run(service, seed=31), batch, 2)


def test_unload_model_frees_the_run_and_keeps_the_base(service, batch):
    a, b = new_run(service), new_run(service)
    a.unload_model().result()
    with pytest.raises(ModelUnloadedError):
        a.forward_backward(batch).result()
    assert b.forward(batch).result().metrics["loss:sum"] > 0
    assert TINY in [m.model_name for m in service.get_server_capabilities().supported_models]


def test_tokenizer_encode_decode(service):
    client = new_run(service)
    text = "héllo, tinkerd!"
    tokens = client.encode(text)
    assert tokens == list(text.encode())  # byte-level: one token per UTF-8 byte
    assert client.decode(tokens) == text
    assert client.get_tokenizer().eos_token_id == 257


def test_both_transports_give_the_same_losses(engine, server, batch):
    embedded = ServiceClient(transport=InProcessTransport(engine=engine))
    http = ServiceClient(base_url=server.url, api_key=KEYS[0])
    expected = train(new_run(embedded, seed=41), batch, 3)
    assert train(new_run(http, seed=41), batch, 3) == pytest.approx(expected, rel=1e-5)
    http.close()


def test_inputs_a_loss_does_not_read_are_ignored(service, batch):
    client = new_run(service)
    extra = [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs={**d.loss_fn_inputs, "advantages": [0.0] * d.model_input.length},
        )
        for d in batch
    ]
    assert logprobs(client, extra) == logprobs(client, batch)
