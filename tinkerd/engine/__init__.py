"""The engine: LoRA training runs on shared base models (`Engine`, `tinkerd.engine.engine`)."""

from tinkerd.engine.engine import Engine, EngineConfig, LossRequest, SamplerWeights

__all__ = ["Engine", "EngineConfig", "LossRequest", "SamplerWeights"]
