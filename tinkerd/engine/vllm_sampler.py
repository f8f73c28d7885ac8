"""Sampling on vLLM (`pip install tinkerd[vllm]`, CUDA GPUs): the `SamplerBackend` for
`tinkerd serve --sampler vllm`.

vLLM loads the base model from the same directory as the engine and decodes with its own
paged KV cache and continuous batching. Each adapter is handed over as a PEFT directory
(`LoRARequest` by path): the sampler-weight version's adapter is written once from the
engine's frozen copy (a version never changes, so one export per version), and vLLM
swaps adapters per request without reloading the base. Requests queued while a batch is
decoding go to vLLM together in the next `generate` call.

Logprobs: vLLM's default `logprobs_mode` ("raw_logprobs") reports the model's distribution
before temperature and top-k/top-p, the same number tinkerd's built-in sampler and a
training forward give (up to bf16 kernels: compare at the model's dtype).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import deque
from concurrent.futures import Future
from pathlib import Path

from tinkerd.engine.models import BaseModel
from tinkerd.engine.sampling.spec import BASE_ADAPTER, SampleSpec
from tinkerd.errors import InvalidRequestError
from tinkerd.types import SampledSequence, SampleResponse

GPU_MEMORY_FRACTION = float(os.environ.get("TINKERD_VLLM_GPU_MEMORY", "0.4"))
"""Share of the GPU vLLM may take (weights + KV cache); the training engine has the rest."""
MAX_LORA_RANK = int(os.environ.get("TINKERD_VLLM_MAX_LORA_RANK", "64"))
MAX_LORAS = int(os.environ.get("TINKERD_VLLM_MAX_LORAS", "8"))
"""Adapters vLLM holds on the GPU at once; more are swapped in from its CPU cache."""


def check_vllm_available() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise InvalidRequestError(
            "the vllm sampler backend needs vLLM: pip install 'tinkerd[vllm]'"
        ) from e
    import torch

    if not torch.cuda.is_available():
        raise InvalidRequestError("the vllm sampler backend needs a CUDA GPU")


def check_adapter(base: BaseModel, adapter: str) -> None:
    """Refuse an adapter this backend would not apply in full: LoRA on fused expert
    weights (`train_mlp` on a mixture-of-experts base, PEFT's `target_parameters`) is
    not handed to vLLM, so sampling it here would drop the experts' update."""
    config = (base.peft_model.peft_config if base.peft_model is not None else {}).get(adapter)
    if config is not None and getattr(config, "target_parameters", None):
        raise InvalidRequestError(
            "the vllm sampler backend cannot apply LoRA on fused expert weights "
            "(train_mlp on a mixture-of-experts base); use the default sampler backend"
        )


class VLLMSampler:
    """Decodes every sample request on one base model with vLLM, on a background thread."""

    def __init__(self, base: BaseModel):
        from vllm import LLM

        self.base = base
        self.llm = LLM(
            model=str(base.path),
            enable_lora=True,
            max_lora_rank=MAX_LORA_RANK,
            max_loras=MAX_LORAS,
            gpu_memory_utilization=GPU_MEMORY_FRACTION,
        )
        self._exports = tempfile.TemporaryDirectory(prefix="tinkerd-vllm-")
        self._lora_ids: dict[str, int] = {}  # adapter name -> vLLM's int id
        self._pending: deque[tuple[SampleSpec, Future]] = deque()
        self._running: list[SampleSpec] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vllm-sampler", daemon=True)
        self._thread.start()

    def submit(self, spec: SampleSpec) -> Future:
        check_adapter(self.base, spec.adapter)
        if spec.images:  # vLLM takes images its own way; not wired here
            raise InvalidRequestError("prompt: images are not supported by the vllm sampler")
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise InvalidRequestError("the sampler was closed")
            self._pending.append((spec, future))
            self._cond.notify()
        return future

    def adapters_in_use(self) -> set[str]:
        with self._cond:
            return {s.adapter for s, _ in self._pending} | {s.adapter for s in self._running}

    def recent_steps(self) -> list[tuple[int, int]]:
        return []  # vLLM schedules its own steps; it does not report them

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._exports.cleanup()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for _, future in self._pending:
                        future.set_exception(RuntimeError("the sampler was closed"))
                    return
                jobs = list(self._pending)
                self._pending.clear()
                self._running = [s for s, _ in jobs]
            try:
                outputs = self.llm.generate(
                    [{"prompt_token_ids": spec.prompt} for spec, _ in jobs],
                    [self._params(spec) for spec, _ in jobs],
                    lora_request=[self._lora(spec.adapter) for spec, _ in jobs],
                    use_tqdm=False,
                )
                for (spec, future), output in zip(jobs, outputs):
                    future.set_result(_response(spec, output))
            except Exception as e:  # noqa: BLE001 -- every waiting request gets the error
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
            finally:
                with self._cond:
                    self._running = []

    def _params(self, spec: SampleSpec):
        from vllm import SamplingParams

        return SamplingParams(
            n=spec.num_samples,
            temperature=spec.temperature,
            top_k=spec.top_k or -1,
            top_p=spec.top_p,
            max_tokens=spec.max_tokens,
            seed=spec.seed,
            stop=list(spec.stop_strings) or None,
            stop_token_ids=sorted(spec.stop_tokens),
            ignore_eos=True,  # tinkerd's stop set already holds EOS when the user gave none
            include_stop_str_in_output=True,  # tinkerd's tokens include the stop
            logprobs=max(1, spec.topk_sample_logprobs),
            prompt_logprobs=spec.topk_prompt_logprobs if spec.prompt_logprobs else None,
            detokenize=bool(spec.stop_strings),
        )

    def _lora(self, adapter: str):
        """The adapter as a vLLM LoRARequest, exported to a PEFT directory on first use."""
        if adapter == BASE_ADAPTER:
            return None
        from vllm.lora.request import LoRARequest

        if adapter not in self._lora_ids:
            with self.base.lock:
                self.base.peft_model.save_pretrained(
                    self._exports.name, selected_adapters=[adapter]
                )
            self._lora_ids[adapter] = len(self._lora_ids) + 1
        path = Path(self._exports.name) / adapter
        return LoRARequest(adapter, self._lora_ids[adapter], str(path))


def _response(spec: SampleSpec, output) -> SampleResponse:
    """vLLM's RequestOutput as tinkerd's SampleResponse."""
    sequences = []
    for completion in output.outputs:
        tokens = list(completion.token_ids)
        steps = completion.logprobs or []
        sequences.append(
            SampledSequence(
                stop_reason="stop" if completion.finish_reason == "stop" else "length",
                tokens=tokens,
                logprobs=[step[t].logprob for t, step in zip(tokens, steps)],
                topk_logprobs=[_top(step, spec.topk_sample_logprobs) for step in steps]
                if spec.topk_sample_logprobs
                else None,
            )
        )
    prompt_logprobs = topk_prompt = None
    if spec.prompt_logprobs and output.prompt_logprobs is not None:
        steps = output.prompt_logprobs  # [prompt_len], None at position 0
        prompt_logprobs = [None] + [s[t].logprob for t, s in zip(spec.prompt[1:], steps[1:])]
        if spec.topk_prompt_logprobs:
            topk_prompt = [None] + [_top(s, spec.topk_prompt_logprobs) for s in steps[1:]]
    return SampleResponse(
        sequences=sequences,
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=topk_prompt,
        type="sample",
    )


def _top(step: dict, k: int) -> list[tuple[int, float]]:
    """The k most likely (token, logprob) of one position of vLLM's logprob dicts."""
    ranked = sorted(step.items(), key=lambda item: item[1].logprob, reverse=True)
    return [(token, lp.logprob) for token, lp in ranked[:k]]
