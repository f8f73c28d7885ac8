"""The engine: LoRA training runs on shared base models (`Engine`, `tinkerd.engine.engine`)."""

from tinkerd.threads import prefer_passive_wait

prefer_passive_wait()  # before torch loads (`tinkerd.threads`)

from tinkerd.engine.engine import Engine, EngineConfig, LossRequest, SamplerWeights  # noqa: E402

__all__ = ["Engine", "EngineConfig", "LossRequest", "SamplerWeights"]
