"""tinkerd: a self-hosted, Tinker-compatible LoRA fine-tuning service and SDK."""

from tinkerd import types
from tinkerd.client import APIFuture, RestClient, SamplingClient, ServiceClient, TrainingClient
from tinkerd.custom_loss import RegularizerSpec
from tinkerd.errors import InvalidRequestError, NotFoundError, TinkerdError
from tinkerd.types import (
    AdamOptimizerConfig,
    AdamParams,
    Datum,
    DimuonOptimizerConfig,
    DimuonParams,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ImageAssetPointerChunk,
    ImageChunk,
    ModelInput,
    SampleResponse,
    SamplingParams,
    TensorData,
)

__version__ = "0.1.0"

__all__ = [
    "APIFuture",
    "AdamOptimizerConfig",
    "AdamParams",
    "Datum",
    "DimuonOptimizerConfig",
    "DimuonParams",
    "EncodedTextChunk",
    "ImageAssetPointerChunk",
    "ImageChunk",
    "ForwardBackwardOutput",
    "InvalidRequestError",
    "ModelInput",
    "NotFoundError",
    "RegularizerSpec",
    "RestClient",
    "SampleResponse",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "TensorData",
    "TinkerdError",
    "TrainingClient",
    "types",
]
