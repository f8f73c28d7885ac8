"""The sampler backend interface: the engine samples through whatever backend it is given;
the vLLM backend maps tinkerd's requests and vLLM's outputs faithfully, and runs end to end
where a CUDA GPU and vLLM exist."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, make_datum

from tinkerd import AdamParams, SamplingParams, ServiceClient, cli
from tinkerd.client.transport import InProcessTransport
from tinkerd.engine import Engine
from tinkerd.engine.sampling.backend import SamplerBackend, sampler_factory
from tinkerd.engine.sampling.sampler import Sampler
from tinkerd.engine.sampling.spec import make_spec
from tinkerd.engine.vllm_sampler import _response
from tinkerd.errors import InvalidRequestError

HAS_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class RecordingBackend(Sampler):
    """The built-in sampler, recording what the engine hands it."""

    made: list["RecordingBackend"] = []

    def __init__(self, base):
        super().__init__(base)
        self.specs = []
        RecordingBackend.made.append(self)

    def submit(self, spec):
        self.specs.append(spec)
        return super().submit(spec)


def test_engine_samples_through_the_backend_it_is_given(tmp_path):
    assert isinstance(Sampler.__new__(Sampler), SamplerBackend)
    engine = Engine(data_dir=tmp_path, sampler_factory=RecordingBackend)
    service = ServiceClient(transport=InProcessTransport(engine=engine))
    client = service.create_lora_training_client(TINY, rank=8, seed=0)
    client.forward_backward([make_datum([256, *b"abcabc"])], "cross_entropy")
    client.optim_step(AdamParams(learning_rate=1e-2)).result()
    sampler = client.save_weights_and_get_sampling_client()
    result = sampler.sample([256, 7], 3, SamplingParams(max_tokens=5, stop=[])).result()
    assert [len(s.tokens) for s in result.sequences] == [5, 5, 5]
    (backend,) = RecordingBackend.made
    (spec,) = backend.specs
    assert (spec.prompt, spec.num_samples, spec.max_tokens) == ([256, 7], 3, 5)
    assert spec.adapter in engine.base_model(TINY).peft_model.peft_config  # the version's copy
    # The engine's batching statistics come through the interface: 5 decode steps of 3 rows.
    assert engine.sampler_stats(TINY) == backend.recent_steps() == [(3, 1)] * 5
    backend.close()


def test_every_backend_implements_the_interface():
    from tinkerd.engine.vllm_sampler import VLLMSampler  # importable without vLLM

    for backend in (Sampler, VLLMSampler):
        assert isinstance(backend.__new__(backend), SamplerBackend), backend


def test_unknown_or_missing_backends_are_refused(capsys, monkeypatch):
    with pytest.raises(InvalidRequestError, match="unknown sampler backend"):
        sampler_factory("tensorrt")
    if not HAS_VLLM:
        with pytest.raises(InvalidRequestError, match=r"tinkerd\[vllm\]|CUDA GPU"):
            sampler_factory("vllm")
        # `tinkerd serve`'s own code, in this process (a subprocess only re-imported torch);
        # should the refusal break, the test fails instead of serving.
        monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("served"))
        capsys.readouterr()
        assert cli.main(["serve", "--sampler", "vllm"]) == 2
        assert "vllm" in capsys.readouterr().err


def _logprob(value):
    return SimpleNamespace(logprob=value)


def test_vllm_outputs_become_tinkerd_responses(engine):
    base = engine.base_model(TINY)
    spec = make_spec(
        base,
        [256, 7, 9],
        2,
        SamplingParams(max_tokens=2),
        prompt_logprobs=True,
        topk_prompt_logprobs=2,
        topk_sample_logprobs=2,
    )
    step = {5: _logprob(-0.1), 6: _logprob(-2.0), 8: _logprob(-3.0)}
    output = SimpleNamespace(
        outputs=[
            SimpleNamespace(token_ids=[5, 6], logprobs=[step, step], finish_reason="length"),
            SimpleNamespace(token_ids=[8], logprobs=[step], finish_reason="stop"),
        ],
        prompt_logprobs=[None, {7: _logprob(-1.5), 1: _logprob(-0.5)}, {9: _logprob(-4.0)}],
    )
    response = _response(spec, output)
    first, second = response.sequences
    assert (first.tokens, first.logprobs, first.stop_reason) == ([5, 6], [-0.1, -2.0], "length")
    assert (second.tokens, second.logprobs, second.stop_reason) == ([8], [-3.0], "stop")
    assert first.topk_logprobs[0] == [(5, -0.1), (6, -2.0)]
    assert response.prompt_logprobs == [None, -1.5, -4.0]
    assert response.topk_prompt_logprobs[1] == [(1, -0.5), (7, -1.5)]


@pytest.mark.skipif(not HAS_VLLM, reason="needs a CUDA GPU and vLLM (pip install tinkerd[vllm])")
def test_vllm_backend_samples_the_runs_adapter(tmp_path):
    from tinkerd.engine.vllm_sampler import VLLMSampler

    engine = Engine(data_dir=tmp_path, sampler_factory=VLLMSampler)
    service = ServiceClient(transport=InProcessTransport(engine=engine))
    client = service.create_lora_training_client(TINY, rank=8, seed=0)
    for _ in range(3):
        client.forward_backward([make_datum([256, *b"abcabcabc"])], "cross_entropy")
        client.optim_step(AdamParams(learning_rate=2e-2))
    sampler = client.save_weights_and_get_sampling_client("vllm")
    prompt = [256, *b"abc"]
    seq = sampler.sample(prompt, 1, SamplingParams(max_tokens=8, temperature=0.0, stop=[]))
    seq = seq.result().sequences[0]
    out = client.forward([make_datum(prompt + seq.tokens)], "cross_entropy").result()
    expected = out.loss_fn_outputs[0]["logprobs"].to_torch()[len(prompt) - 1 :]
    assert torch.allclose(torch.tensor(seq.logprobs), expected, atol=1e-2)
