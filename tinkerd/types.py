"""Wire types, with the names and fields of the official `tinker` SDK.

Every type here serialises to the same JSON as its namesake in the SDK, so a request
built by either client parses on the tinkerd server and vice versa. Conventions:
- token sequences are `[seq_len]`; a datum's `loss_fn_inputs` tensors are aligned with
  its `model_input` (position i predicts target i);
- losses are summed over tokens and data, never averaged.
"""

from __future__ import annotations

import base64
import datetime
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from tinkerd.errors import InvalidRequestError

if TYPE_CHECKING:  # torch is imported only by the helpers that convert to and from it
    import torch

TensorDtype = Literal["int64", "float32"]
ModelID = str


class StrictBase(BaseModel):
    """Request-side base: unknown fields are an error, as in the SDK."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ResponseBase(BaseModel):
    """Response-side base: tolerate fields a newer server may add."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# ---------------------------------------------------------------- tensors

_NUMPY_DTYPE = {"int64": np.int64, "float32": np.float32}

# Dtype of a plain Python list given for a known loss_fn_inputs key (as in the SDK).
_KEY_DTYPE: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
}


def _dtype_of(kind_is_float: bool) -> TensorDtype:
    return "float32" if kind_is_float else "int64"


class TensorData(StrictBase):
    """A dense (or CSR-sparse 2-D) tensor as flat numbers plus a shape."""

    data: list[int] | list[float]
    """Flattened values, row-major. For a sparse tensor: only the stored values."""
    dtype: TensorDtype
    shape: list[int] | None = None
    """Dense shape; None means 1-D of len(data)."""
    sparse_crow_indices: list[int] | None = None
    """CSR row pointers (nrows + 1) when sparse; unlisted entries take `pad_value`."""
    sparse_col_indices: list[int] | None = None
    """CSR column index of each stored value when sparse."""

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        if array.dtype.kind not in "fiub":
            raise ValueError(f"unsupported numpy dtype {array.dtype}")
        return cls(
            data=array.reshape(-1).tolist(),
            dtype=_dtype_of(array.dtype.kind == "f"),
            shape=list(array.shape),
        )

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        import torch

        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16 or tensor.dtype == torch.float16:
            tensor = tensor.float()
        return cls(
            data=tensor.reshape(-1).tolist(),
            dtype=_dtype_of(tensor.is_floating_point()),
            shape=list(tensor.shape),
        )

    def to_torch(self, pad_value: int = 0) -> torch.Tensor:
        import torch

        dtype = {"int64": torch.int64, "float32": torch.float32}[self.dtype]
        if self.sparse_crow_indices is not None:
            if self.sparse_col_indices is None or self.shape is None or len(self.shape) != 2:
                raise ValueError("sparse TensorData needs sparse_col_indices and a 2-D shape")
            dense = torch.full(self.shape, pad_value, dtype=dtype)
            crow = torch.tensor(self.sparse_crow_indices, dtype=torch.int64)
            rows = torch.repeat_interleave(torch.arange(self.shape[0]), crow.diff())
            cols = torch.tensor(self.sparse_col_indices, dtype=torch.int64)
            dense[rows, cols] = torch.tensor(self.data, dtype=dtype)
            return dense
        tensor = torch.tensor(self.data, dtype=dtype)
        return tensor.reshape(self.shape) if self.shape is not None else tensor

    def to_numpy(self, pad_value: int = 0) -> np.ndarray:
        if self.sparse_crow_indices is not None:
            return self.to_torch(pad_value).numpy()
        array = np.asarray(self.data, dtype=_NUMPY_DTYPE[self.dtype])
        return array.reshape(self.shape) if self.shape is not None else array

    def tolist(self, pad_value: int = 0) -> list[Any]:
        return self.to_numpy(pad_value).tolist()


def to_tensor_data(key: str, value: Any) -> TensorData:
    """Coerce what a user may put in `loss_fn_inputs` (TensorData, numpy, torch, list)."""
    if isinstance(value, TensorData):
        return value
    torch = sys.modules.get("torch")  # a value cannot be a tensor if torch was never imported
    if torch is not None and isinstance(value, torch.Tensor):
        return TensorData.from_torch(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if isinstance(value, dict):
        return TensorData.model_validate(value)
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError as e:
            raise ValueError(f"loss_fn_inputs[{key!r}] must be a rectangular array") from e
        if array.dtype.kind not in "fiub" and array.size:
            raise ValueError(f"loss_fn_inputs[{key!r}] must be numeric, got {array.dtype}")
        dtype = _KEY_DTYPE.get(key) or _dtype_of(array.dtype.kind == "f")
        return TensorData.from_numpy(array.astype(_NUMPY_DTYPE[dtype]))
    raise TypeError(f"loss_fn_inputs[{key!r}]: unsupported type {type(value).__name__}")


# ---------------------------------------------------------------- model input


class EncodedTextChunk(StrictBase):
    tokens: list[int]
    """Token ids, `[n]`."""
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


ImageFormat = Literal["png", "jpeg"]


class ImageChunk(StrictBase):
    """An image, as encoded bytes, read by a vision-language model at its place in the
    input: it occupies `expected_tokens` positions (the image tokens its processor makes
    of it; the server computes them and refuses the input if they differ)."""

    data: bytes
    """The encoded image (base64 in JSON, raw bytes in protobuf)."""
    format: ImageFormat
    expected_tokens: int | None = Field(default=None, ge=1)
    """Positions the image takes; None: whatever the model's processor makes of it."""
    type: Literal["image"] = "image"

    @field_validator("data", mode="before")
    @classmethod
    def _from_base64(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except ValueError as e:
                raise ValueError(f"data is not valid base64: {e}") from None
        return value

    @field_serializer("data")
    def _to_base64(self, value: bytes) -> str:
        return base64.b64encode(value).decode()

    @property
    def length(self) -> int:
        return _image_length(self)


class ImageAssetPointerChunk(StrictBase):
    """An image by location: a `file://` path (or a plain absolute path) that the server
    reads from its configured image directory (`serve --image-dir`); nothing else, and
    never a network fetch. Positions as ImageChunk."""

    format: ImageFormat
    location: str
    expected_tokens: int | None = Field(default=None, ge=1)
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        return _image_length(self)


def _image_length(chunk: ImageChunk | ImageAssetPointerChunk) -> int:
    if chunk.expected_tokens is None:
        raise ValueError(f"{type(chunk).__name__} needs expected_tokens to know its length")
    return chunk.expected_tokens


ModelInputChunk = Annotated[
    EncodedTextChunk | ImageChunk | ImageAssetPointerChunk, Field(discriminator="type")
]
"""A text chunk, or an image (for vision-language models)."""


class ModelInput(StrictBase):
    """The tokens a model reads, as a list of chunks (all chunks are read, in order)."""

    chunks: list[ModelInputChunk]

    @model_validator(mode="before")
    @classmethod
    def _untagged_text(cls, values: Any) -> Any:
        """A chunk given as a dict without `type` is text (as clients before images sent)."""
        if isinstance(values, dict) and isinstance(values.get("chunks"), list):
            chunks = [
                {**c, "type": "encoded_text"} if isinstance(c, dict) and "type" not in c else c
                for c in values["chunks"]
            ]
            values = {**values, "chunks": chunks}
        return values

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        """The token ids; a ValueError if there is an image (it has no token ids)."""
        if self.has_images:
            raise ValueError("to_ints: this ModelInput has image chunks, which are not tokens")
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def positions(self) -> int:
        """Its length as far as it is known: images count `expected_tokens`, 0 where unset
        (the engine sets it on reading the image). For metrics; `length` raises instead."""
        return sum(
            len(c.tokens) if c.type == "encoded_text" else c.expected_tokens or 0
            for c in self.chunks
        )

    @property
    def has_images(self) -> bool:
        return any(chunk.type != "encoded_text" for chunk in self.chunks)

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[token]))


class PromptWithImages(list):
    """A sample prompt that holds images, passed where prompts are token-id lists: its
    items are the text's token ids with -1 at each image position (`expected_tokens` of
    each image, none where that is unset); the engine expands `model_input` itself."""

    def __init__(self, model_input: ModelInput):
        super().__init__(
            t
            for chunk in model_input.chunks
            for t in (
                chunk.tokens
                if chunk.type == "encoded_text"
                else [-1] * (chunk.expected_tokens or 0)
            )
        )
        self.model_input = model_input


def prompt_tokens(model_input: ModelInput) -> list[int]:
    """A prompt's token ids, or a PromptWithImages when it has images."""
    return PromptWithImages(model_input) if model_input.has_images else model_input.to_ints()


def chunk_from(chunk: Any) -> EncodedTextChunk | ImageChunk | ImageAssetPointerChunk:
    """Ours, or any chunk with the same fields (the official SDK's), as ours."""
    if isinstance(chunk, (EncodedTextChunk, ImageChunk, ImageAssetPointerChunk)):
        return chunk
    kind = getattr(chunk, "type", "encoded_text")
    if kind == "encoded_text":
        return EncodedTextChunk(tokens=list(chunk.tokens))
    if kind == "image":
        return ImageChunk(
            data=chunk.data, format=chunk.format, expected_tokens=chunk.expected_tokens
        )
    if kind == "image_asset_pointer":
        return ImageAssetPointerChunk(
            format=chunk.format, location=chunk.location, expected_tokens=chunk.expected_tokens
        )
    raise InvalidRequestError(f"model_input: unsupported chunk type {kind!r}")


class Datum(StrictBase):
    """One training sequence: its input tokens and the per-token tensors its loss needs."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _coerce_loss_fn_inputs(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("loss_fn_inputs"), dict):
            values = dict(values)
            values["loss_fn_inputs"] = {
                k: to_tensor_data(k, v) for k, v in values["loss_fn_inputs"].items()
            }
        return values


# ---------------------------------------------------------------- training


Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]
"""What torch's generators take: a seed beyond it is refused with the request."""


class LoraConfig(StrictBase):
    rank: int = 32
    seed: Seed | None = None
    """Seed of the adapter's initial weights; None draws one at random."""
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


LossFnOutput = dict[str, TensorData]


class ForwardBackwardOutput(ResponseBase):
    loss_fn_output_type: str
    loss_fn_outputs: list[LossFnOutput]
    """Per datum, in input order: `logprobs` `[seq_len]` and `elementwise_loss` `[seq_len]`."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """E.g. `loss:sum` (summed over every token of every datum)."""


class AdamParams(StrictBase):
    """One Adam step, exactly torch.optim.AdamW (decoupled weight decay)."""

    learning_rate: float = 0.0001
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


class DimuonParams(StrictBase):
    """One Dimuon step (`tinker.types.DimuonParams`, with `type` "dimuon"). The update of
    each LoRA matrix is learning_rate * (32 / rank)^rank_lr_correction_exponent times a
    direction of Frobenius norm sqrt(rank) (see `tinkerd.engine.optimizers`). The SDK's
    0.38 type lacks `damping` and `rank_lr_correction_exponent`; tinkerd takes them,
    with Tinker's published defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["dimuon"] = "dimuon"
    learning_rate: float = Field(ge=0)
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 or less disables clipping."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """Momentum: the weight of the running average of gradients."""
    damping: float = Field(default=1e-4, gt=0)
    """Added to the normalised row and column energies before the preconditioner's power."""
    rank_lr_correction_exponent: float = 0.175
    """e in the factor (32 / rank)^e on the learning rate (1 at rank 32)."""


OptimParams = AdamParams | DimuonParams
"""An optim_step's hyperparameters: of the optimizer the run was created with."""


def _validated(cls: type[BaseModel], data: Mapping[str, Any]) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise InvalidRequestError(f"invalid {cls.__name__}: {errors}") from None


def _as_mapping(value: Any, expected: str) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    if hasattr(value, "model_dump"):  # e.g. the official SDK's type of the same name
        return value.model_dump()
    raise InvalidRequestError(f"expected {expected}, got {type(value).__name__}")


def optim_params_from(value: Any) -> OptimParams:
    """Ours, the official SDK's, or their JSON: the params of the optimizer its `type`
    names (`OPTIMIZERS`); no `type` (the SDK sends none for Adam) is AdamParams."""
    if isinstance(value, tuple(k.params for k in OPTIMIZERS.values())):
        return value
    data = dict(_as_mapping(value, "AdamParams or DimuonParams"))
    kind = OPTIMIZERS.get(data.get("type") or "adamw")
    if kind is None:
        names = " or ".join(k.params.__name__ for k in OPTIMIZERS.values())
        raise InvalidRequestError(
            f"optimizer_params: unknown optimizer params type {data['type']!r}: give {names}"
        )
    if "type" not in kind.params.model_fields:
        data.pop("type", None)
    return _validated(kind.params, data)


def optimizer_of_params(params: OptimParams) -> str:
    """The `OPTIMIZERS` key whose params `params` are."""
    return next(name for name, kind in OPTIMIZERS.items() if isinstance(params, kind.params))


class OptimStepResponse(ResponseBase):
    metrics: dict[str, float] | None = None
    """`grad_norm` (global L2 norm before clipping), `learning_rate`, `optim/step` (steps
    taken; not `step`, which trainers log themselves)."""


class ModelData(ResponseBase):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class AdamOptimizerConfig(ResponseBase):
    """The default optimizer: AdamW, stepped with AdamParams."""

    type: Literal["adamw"] = "adamw"


class DimuonOptimizerConfig(ResponseBase):
    """The Dimuon optimizer, stepped with DimuonParams (fixed when the run is created)."""

    type: Literal["dimuon"] = "dimuon"
    version: Literal[1] = 1


AnyOptimizerConfig = AdamOptimizerConfig | DimuonOptimizerConfig
"""Every optimizer's config type (a new optimizer adds its own here and in `OPTIMIZERS`)."""
OptimizerConfig = Annotated[AnyOptimizerConfig, Field(discriminator="type")]
"""A run's optimizer, chosen at creation (CreateModelRequest.optimizer_config)."""


class OptimizerKind(NamedTuple):
    """What travels for one optimizer: its config (at creation) and params (per step)."""

    config: type[BaseModel]
    params: type[BaseModel]
    wire_field: str
    """The optim_step field the SDK sends its params in."""


OPTIMIZERS: dict[str, OptimizerKind] = {
    "adamw": OptimizerKind(AdamOptimizerConfig, AdamParams, "adam_params"),
    "dimuon": OptimizerKind(DimuonOptimizerConfig, DimuonParams, "optimizer_params"),
}
"""The optimizers by their `type`: every list of them reads this one (the engine's
implementations: `engine.optimizers.OPTIMIZER_IMPLS`)."""


def optimizer_config_from(value: Any) -> AnyOptimizerConfig:
    """Ours, the official SDK's, or their JSON (`type` one of `OPTIMIZERS`)."""
    if isinstance(value, tuple(k.config for k in OPTIMIZERS.values())):
        return value  # type: ignore[return-value]
    data = _as_mapping(value, "AdamOptimizerConfig or DimuonOptimizerConfig")
    kind = OPTIMIZERS.get(data.get("type"))  # type: ignore[arg-type]
    if kind is None:
        known = ", ".join(repr(name) for name in OPTIMIZERS)
        raise InvalidRequestError(
            f"optimizer_config: unknown optimizer type {data.get('type')!r}; known: {known}"
        )
    unknown = set(data) - set(kind.config.model_fields)
    if unknown:  # a newer optimizer version's fields: refused, never silently dropped
        raise InvalidRequestError(f"{kind.config.__name__} has no field(s) {sorted(unknown)}")
    return _validated(kind.config, data)


class GetInfoResponse(ResponseBase):
    type: Literal["get_info"] | None = None
    model_data: ModelData
    model_id: ModelID
    optimizer_config: OptimizerConfig = Field(default_factory=AdamOptimizerConfig)
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


class UnloadModelResponse(ResponseBase):
    model_id: ModelID
    type: Literal["unload_model"] | None = None


class SupportedModel(ResponseBase):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class GetServerCapabilitiesResponse(ResponseBase):
    supported_models: list[SupportedModel]


# ---------------------------------------------------------------- forward_backward_custom


class BaseLossReport(ResponseBase):
    value: float
    grad_norm: float | None = None
    """L2 norm of d(base loss)/d(logprobs of the whole batch); with track_grad_norms."""
    custom: dict[str, float] = Field(default_factory=dict)


class RegularizerReport(ResponseBase):
    value: float
    """The regularizer's unweighted value."""
    weight: float
    contribution: float
    """weight * value: what it adds to loss_total."""
    grad_norm: float | None = None
    """L2 norm of d(value)/d(logprobs of the whole batch); with track_grad_norms."""
    grad_norm_weighted: float | None = None
    """|weight| * grad_norm: the norm of the weighted term's gradient."""
    custom: dict[str, float] = Field(default_factory=dict)


class CustomLossOutput(ForwardBackwardOutput):
    """ForwardBackwardOutput of forward_backward_custom, with the loss broken down.

    loss_total = base_loss.value + regularizer_total; the model's gradient is that of
    loss_total. `metrics` carries flattened copies (`loss:sum` is loss_total)."""

    loss_total: float
    base_loss: BaseLossReport | None = None
    regularizers: dict[str, RegularizerReport] = Field(default_factory=dict)
    regularizer_total: float = 0.0
    total_grad_norm: float | None = None


# ---------------------------------------------------------------- sampling

StopReason = Literal["length", "stop"]


class SamplingParams(StrictBase):
    max_tokens: int | None = None
    """Most tokens to generate; None = until a stop or the end of the context window."""
    seed: Seed | None = None
    """Same seed, prompt and weights give the same tokens, whatever else shares the batch."""
    stop: str | list[str] | list[int] | None = None
    """Stop strings or token ids. None stops at the tokenizer's EOS; a list replaces EOS
    (`[]` never stops early). The token that completes a stop is included in the output."""
    temperature: float = 1
    """0 is greedy decoding."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 (or 0) keeps all."""
    top_p: float = 1
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""


class SampledSequence(ResponseBase):
    stop_reason: StopReason
    tokens: list[int]
    """Generated token ids `[n_generated]`, the stop token included."""
    logprobs: list[float] | None = None
    """Log-probability of each generated token under the model (temperature 1, before
    top-k/top-p): the same number a training forward computes for that token."""
    topk_logprobs: list[list[tuple[int, float]] | None] | None = None
    """With topk_sample_logprobs=k: the k most likely (token, logprob) at each position."""
    sequence_id: str | None = None


class SampleResponse(ResponseBase):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    """`[prompt_len]`: logprob of each prompt token given those before it; None at 0."""
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    """`[prompt_len]`: the k most likely (token, logprob) at each prompt position."""
    prompt_cache_hit_tokens: int = 0
    type: Literal["sample"] | None = None


class SaveWeightsForSamplerResponse(ResponseBase):
    path: str
    """`tinker://<model_id>/sampler_weights/<name>`"""
    type: Literal["save_weights_for_sampler"] | None = None


class CreateModelResponse(ResponseBase):
    model_id: ModelID
    type: Literal["create_model"] | None = None


class SaveWeightsForSamplerResponseInternal(ResponseBase):
    """What the server answers a save for sampling: the path of named weights, or the
    sampling session opened on unnamed ones (in-process: the engine's sampler id)."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] | None = None


class CreateSamplingSessionResponse(ResponseBase):
    sampling_session_id: str
    base_model: str | None = None
    """tinkerd's addition: the base model of the weights (the SDK ignores it)."""
    type: Literal["create_sampling_session"] | None = None


class SaveWeightsExternalResponse(ResponseBase):
    path: str
    """`tinker://<model_id>/external_weights/<name>`"""
    size_bytes: int | None = None
    type: Literal["save_weights_external"] | None = None


# ---------------------------------------------------------------- checkpoints and runs

CheckpointType = Literal["training", "sampler", "external"]


class SaveWeightsResponse(ResponseBase):
    path: str
    """`tinker://<model_id>/weights/<name>`"""
    type: Literal["save_weights"] | None = None


class LoadWeightsResponse(ResponseBase):
    path: str | None = None
    model_id: ModelID | None = None
    type: Literal["load_weights"] | None = None


class WeightsInfoResponse(ResponseBase):
    """What a checkpoint needs to be loaded: its base model and LoRA shape."""

    base_model: str
    optimizer_config: OptimizerConfig = Field(default_factory=AdamOptimizerConfig)
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class Checkpoint(ResponseBase):
    checkpoint_id: str
    """`<kind>/<name>`, e.g. `weights/step-100`."""
    checkpoint_type: CheckpointType
    time: datetime.datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime.datetime | None = None


class Cursor(ResponseBase):
    offset: int
    limit: int
    total_count: int


class CheckpointsListResponse(ResponseBase):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(ResponseBase):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime.datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(ResponseBase):
    training_runs: list[TrainingRun]
    cursor: Cursor


class CheckpointArchiveUrlResponse(ResponseBase):
    url: str
    """A signed URL that downloads the checkpoint's directory as a tar archive."""
    expires: datetime.datetime
    """When the URL stops working."""
