"""The engine: LoRA training runs on shared base models (`Engine`, `tinkerd.engine.engine`).

Its names load on first use, so a torch-free module of the package (e.g. the sampler
backends' registry, which the CLI reads) can be imported without torch.
"""

from typing import Any

from tinkerd.threads import prefer_passive_wait

prefer_passive_wait()  # before any engine module loads torch (`tinkerd.threads`)

__all__ = ["Engine", "EngineConfig", "LossRequest", "SamplerWeights"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tinkerd.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'tinkerd.engine' has no attribute {name!r}")
