"""Protobuf messages of Tinker's wire protocol, and conversions to tinkerd types.

The official SDK (0.38) always sends `forward_backward` as protobuf and only accepts
forward/backward and sampling *results* as protobuf; every other body is JSON. The schema
below is written from the field numbers documented in docs/wire-protocol.md and built
into message classes at import time (no generated code, no protoc).

Token arrays travel as little-endian int32 bytes, tensors as raw little-endian bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from tinkerd.errors import InvalidRequestError
from tinkerd.types import (
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ImageChunk,
    ModelInput,
    ModelInputChunk,
    SampledSequence,
    SampleResponse,
    TensorData,
)

F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": F.TYPE_STRING,
    "bytes": F.TYPE_BYTES,
    "int32": F.TYPE_INT32,
    "int64": F.TYPE_INT64,
    "uint32": F.TYPE_UINT32,
    "double": F.TYPE_DOUBLE,
    "bool": F.TYPE_BOOL,
}

# message -> [(field, number, type, label)], label: "" | "repeated" | "optional" | "oneof:<name>"
# | "map:<key type>". A type that is not a scalar names a message or enum of this file.
_SCHEMA: dict[str, list[tuple[str, int, str, str]]] = {
    "ForwardBackwardRequest": [
        ("model_id", 1, "string", ""),
        ("seq_id", 2, "int32", ""),
        ("data", 3, "Datum", "repeated"),
        ("loss_fn", 4, "string", ""),
        ("loss_fn_config", 5, "double", "map:string"),
        ("forward_only", 6, "bool", ""),
        ("loss_fn_config_v2", 7, "LossConfigValue", "map:string"),
    ],
    "LossConfigValue": [
        ("number", 1, "double", "oneof:value"),
        ("text", 2, "string", "oneof:value"),
    ],
    "Datum": [
        ("model_input", 1, "Chunk", "repeated"),
        ("loss_fn_inputs", 2, "Tensor", "map:string"),
    ],
    "Chunk": [
        ("encoded_text", 1, "EncodedTextChunk", "oneof:chunk"),
        ("image", 2, "ImageChunk", "oneof:chunk"),
        ("dmel", 3, "DmelChunk", "oneof:chunk"),
    ],
    "EncodedTextChunk": [("tokens", 1, "bytes", "")],
    "ImageChunk": [
        ("data", 1, "bytes", ""),
        ("format", 2, "string", ""),
        ("expected_tokens", 3, "int32", "optional"),
        ("override_dimensions", 4, "ImageDimensions", "optional"),
    ],
    "ImageDimensions": [("width", 1, "uint32", ""), ("height", 2, "uint32", "")],
    "DmelChunk": [("dmel", 1, "bytes", "")],
    "Tensor": [
        ("dense", 1, "bytes", "oneof:encoding"),
        ("sparse_csr", 2, "SparseCsr", "oneof:encoding"),
        ("dtype", 3, "DType", ""),
        ("shape", 4, "int64", "repeated"),
    ],
    "SparseCsr": [
        ("values", 1, "bytes", ""),
        ("crow_indices", 2, "bytes", ""),
        ("col_indices", 3, "bytes", ""),
    ],
    "ForwardBackwardOutput": [
        ("loss_fn_output_type", 1, "string", ""),
        ("loss_fn_outputs", 2, "ArrayRecord", "repeated"),
        ("metrics", 3, "double", "map:string"),
    ],
    "ArrayRecord": [
        ("type_tag", 1, "string", ""),
        ("fields", 2, "BatchedTensor", "map:string"),
        ("num_datums", 3, "int64", ""),
    ],
    "BatchedTensor": [
        ("data", 1, "bytes", ""),
        ("offsets", 2, "bytes", ""),
        ("dtype", 3, "DType", ""),
        ("trailing_shape", 4, "int64", "repeated"),
    ],
    "SampleResponse": [
        ("sequences", 1, "SampledSequence", "repeated"),
        ("prompt_logprobs", 2, "bytes", "optional"),
        ("topk_prompt_logprobs", 3, "TopkLogprobs", "optional"),
        ("prompt_cache_hit_tokens", 4, "int32", ""),
    ],
    "SampledSequence": [
        ("stop_reason", 1, "StopReason", ""),
        ("tokens", 2, "bytes", ""),
        ("logprobs", 3, "bytes", "optional"),
        ("topk_sampled_logprobs", 4, "TopkLogprobs", "optional"),
    ],
    "TopkLogprobs": [
        ("token_ids", 1, "bytes", ""),
        ("logprobs", 2, "bytes", ""),
        ("k", 3, "uint32", ""),
        ("length", 4, "uint32", ""),
    ],
}
_ENUMS = {
    "DType": ["DTYPE_UNSPECIFIED", "DTYPE_FLOAT32", "DTYPE_INT64", "DTYPE_INT32", "DTYPE_BFLOAT16"],
    "StopReason": ["STOP_REASON_STOP", "STOP_REASON_LENGTH"],
}
PACKAGE = "tinker_public"


def _build() -> dict[str, type]:
    file = descriptor_pb2.FileDescriptorProto(
        name="tinkerd_wire.proto", package=PACKAGE, syntax="proto3"
    )
    for name, values in _ENUMS.items():
        enum = file.enum_type.add(name=name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for name, fields in _SCHEMA.items():
        message = file.message_type.add(name=name)
        oneofs: dict[str, int] = {}
        for field_name, number, type_name, label in fields:
            field = message.field.add(name=field_name, number=number, label=F.LABEL_OPTIONAL)
            if label == "repeated":
                field.label = F.LABEL_REPEATED
            if label.startswith("map:"):  # a map is a repeated nested entry message
                entry = message.nested_type.add(name=f"{_camel(field_name)}Entry")
                entry.options.map_entry = True
                entry.field.add(
                    name="key", number=1, label=F.LABEL_OPTIONAL, type=_SCALARS[label[4:]]
                )
                _set_type(
                    entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL), type_name
                )
                field.label = F.LABEL_REPEATED
                field.type = F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{name}.{entry.name}"
                continue
            _set_type(field, type_name)
            if label.startswith("oneof:") or label == "optional":
                group = label[6:] if label.startswith("oneof:") else f"_{field_name}"
                if group not in oneofs:
                    oneofs[group] = len(message.oneof_decl)
                    message.oneof_decl.add(name=group)
                field.oneof_index = oneofs[group]
                field.proto3_optional = label == "optional"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in _SCHEMA
    }


def _camel(name: str) -> str:
    return "".join(part.title() for part in name.split("_"))


def _set_type(field: descriptor_pb2.FieldDescriptorProto, type_name: str) -> None:
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    else:
        field.type = F.TYPE_ENUM if type_name in _ENUMS else F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{type_name}"


MESSAGES = _build()
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 1, 2, 3, 4
_NP = {DTYPE_FLOAT32: "<f4", DTYPE_INT64: "<i8", DTYPE_INT32: "<i4"}
_WIRE_DTYPE = {"float32": DTYPE_FLOAT32, "int64": DTYPE_INT64}


class ProtoDecodeError(InvalidRequestError):
    """A protobuf body that does not decode to what the endpoint takes."""

    model_id: str | None = None
    seq_id: int | None = None
    """Of a body that parsed but whose data did not decode (None if it did not parse)."""


# ---------------------------------------------------------------- forward_backward request


def encode_forward_backward_request(
    model_id: str,
    seq_id: int,
    data: list[Datum],
    loss_fn: str,
    loss_fn_config: Mapping[str, float | str] | None,
    forward_only: bool,
) -> bytes:
    msg = MESSAGES["ForwardBackwardRequest"](
        model_id=model_id, seq_id=seq_id, loss_fn=loss_fn, forward_only=forward_only
    )
    for key, value in (loss_fn_config or {}).items():
        if isinstance(value, str):
            msg.loss_fn_config_v2[key].text = value
        else:
            msg.loss_fn_config[key] = float(value)
            msg.loss_fn_config_v2[key].number = float(value)
    for datum in data:
        d = msg.data.add()
        for chunk in datum.model_input.chunks:
            _fill_chunk(d.model_input.add(), chunk)
        for key, tensor in datum.loss_fn_inputs.items():
            _fill_tensor(d.loss_fn_inputs[key], tensor)
    return msg.SerializeToString()


def _fill_chunk(out, chunk: ModelInputChunk) -> None:
    """A chunk as the SDK writes it: text as int32 bytes, an image's bytes as they are
    (an image by location has no protobuf form: the SDK refuses to send one too)."""
    if chunk.type == "encoded_text":
        out.encoded_text.tokens = np.asarray(chunk.tokens, "<i4").tobytes()
    elif chunk.type == "image":
        out.image.data, out.image.format = chunk.data, chunk.format
        if chunk.expected_tokens is not None:
            out.image.expected_tokens = chunk.expected_tokens
    else:
        raise InvalidRequestError(f"a {chunk.type} chunk cannot be sent as protobuf")


def _read_chunk(chunk, i: int) -> ModelInputChunk:
    kind = chunk.WhichOneof("chunk")
    if kind == "encoded_text":
        return EncodedTextChunk(tokens=_ints(chunk.encoded_text.tokens, "<i4", i))
    if kind == "image":
        image = chunk.image
        if image.HasField("override_dimensions"):
            raise ProtoDecodeError(f"data[{i}]: image override_dimensions is not supported")
        if image.format not in ("png", "jpeg"):
            raise ProtoDecodeError(
                f"data[{i}]: image format must be 'png' or 'jpeg', got {image.format!r}"
            )
        expected = image.expected_tokens if image.HasField("expected_tokens") else None
        return ImageChunk(data=image.data, format=image.format, expected_tokens=expected)
    raise ProtoDecodeError(f"data[{i}]: {kind or 'empty'} chunks are not supported")


def _fill_tensor(out, tensor: TensorData) -> None:
    out.dtype = _WIRE_DTYPE[tensor.dtype]
    np_dtype = _NP[out.dtype]
    if tensor.sparse_crow_indices is not None:
        out.sparse_csr.values = np.asarray(tensor.data, np_dtype).tobytes()
        out.sparse_csr.crow_indices = np.asarray(tensor.sparse_crow_indices, "<i8").tobytes()
        out.sparse_csr.col_indices = np.asarray(tensor.sparse_col_indices, "<i8").tobytes()
    else:
        out.dense = np.asarray(tensor.data, np_dtype).tobytes()
    out.shape.extend(tensor.shape if tensor.shape is not None else [len(tensor.data)])


def decode_forward_backward_request(body: bytes) -> dict:
    """-> dict(model_id, seq_id, data: list[Datum], loss_fn, loss_fn_config, forward_only)."""
    msg = MESSAGES["ForwardBackwardRequest"]()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf raises its own DecodeError type
        raise ProtoDecodeError(f"body is not a ForwardBackwardRequest protobuf: {e}") from None
    try:
        config: dict[str, float | str] = dict(msg.loss_fn_config)
        for key, value in msg.loss_fn_config_v2.items():
            config[key] = value.text if value.WhichOneof("value") == "text" else value.number
        data = []
        for i, d in enumerate(msg.data):
            chunks = [_read_chunk(chunk, i) for chunk in d.model_input]
            inputs = {
                key: _tensor_data(t, f"data[{i}].loss_fn_inputs[{key!r}]")
                for key, t in d.loss_fn_inputs.items()
            }
            data.append(Datum(model_input=ModelInput(chunks=chunks), loss_fn_inputs=inputs))
    except (ProtoDecodeError, ValueError) as e:  # pydantic's errors are ValueErrors
        error = e if isinstance(e, ProtoDecodeError) else ProtoDecodeError(f"data: {e}")
        error.model_id, error.seq_id = msg.model_id, msg.seq_id  # the route releases seq_id
        raise error from None
    return dict(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        data=data,
        loss_fn=msg.loss_fn,
        loss_fn_config=config or None,
        forward_only=msg.forward_only,
    )


def _ints(raw: bytes, dtype: str, i: int) -> list[int]:
    if len(raw) % np.dtype(dtype).itemsize:
        raise ProtoDecodeError(f"data[{i}]: token bytes are not a whole number of {dtype}")
    return np.frombuffer(raw, dtype).tolist()


def _tensor_data(t, where: str) -> TensorData:
    if t.dtype not in (DTYPE_FLOAT32, DTYPE_INT64):
        raise ProtoDecodeError(f"{where}: dtype must be float32 or int64")
    np_dtype = _NP[t.dtype]
    name = "float32" if t.dtype == DTYPE_FLOAT32 else "int64"
    shape = list(t.shape) or None
    try:
        if t.WhichOneof("encoding") == "sparse_csr":
            return TensorData(
                data=np.frombuffer(t.sparse_csr.values, np_dtype).tolist(),
                dtype=name,
                shape=shape,
                sparse_crow_indices=np.frombuffer(t.sparse_csr.crow_indices, "<i8").tolist(),
                sparse_col_indices=np.frombuffer(t.sparse_csr.col_indices, "<i8").tolist(),
            )
        values = np.frombuffer(t.dense, np_dtype)
    except ValueError as e:
        raise ProtoDecodeError(f"{where}: {e}") from None
    if shape is not None and int(np.prod(shape)) != values.size:
        raise ProtoDecodeError(f"{where}: shape {shape} does not match {values.size} values")
    return TensorData(data=values.tolist(), dtype=name, shape=shape)


# ---------------------------------------------------------------- forward_backward result


def encode_forward_backward_output(out: ForwardBackwardOutput) -> bytes:
    """All data in one ArrayRecord: per field, values laid end to end plus byte offsets."""
    msg = MESSAGES["ForwardBackwardOutput"](loss_fn_output_type=out.loss_fn_output_type)
    msg.metrics.update(out.metrics)
    record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(out.loss_fn_outputs))
    fields = list(out.loss_fn_outputs[0]) if out.loss_fn_outputs else []
    for name in fields:
        first = out.loss_fn_outputs[0][name]
        wire = _WIRE_DTYPE[first.dtype]
        parts = [np.asarray(o[name].data, _NP[wire]).tobytes() for o in out.loss_fn_outputs]
        offsets = np.cumsum([0] + [len(p) for p in parts]).astype("<i8")
        batched = record.fields[name]
        batched.data, batched.offsets, batched.dtype = b"".join(parts), offsets.tobytes(), wire
        batched.trailing_shape.extend((first.shape or [0])[1:])
    return msg.SerializeToString()


def decode_forward_backward_output(body: bytes) -> ForwardBackwardOutput:
    msg = MESSAGES["ForwardBackwardOutput"]()
    msg.ParseFromString(body)
    outputs: list[dict[str, TensorData]] = []
    for record in msg.loss_fn_outputs:
        per_datum: list[dict[str, TensorData]] = [{} for _ in range(record.num_datums)]
        for name, batched in record.fields.items():
            offsets = np.frombuffer(batched.offsets, "<i8")
            trailing = list(batched.trailing_shape)
            for i in range(record.num_datums):
                values = np.frombuffer(
                    batched.data[offsets[i] : offsets[i + 1]], _NP[batched.dtype]
                )
                width = int(np.prod(trailing)) if trailing else 1
                per_datum[i][name] = TensorData(
                    data=values.tolist(),
                    dtype="float32" if batched.dtype == DTYPE_FLOAT32 else "int64",
                    shape=[values.size // width, *trailing],
                )
        outputs.extend(per_datum)
    return ForwardBackwardOutput(
        loss_fn_output_type=msg.loss_fn_output_type.rsplit(":", 1)[-1],
        loss_fn_outputs=outputs,
        metrics=dict(msg.metrics),
    )


# ---------------------------------------------------------------- sample response

_STOP_REASONS = ["stop", "length"]  # enum values 0, 1
MASK_LOGPROB = -99999.0  # an empty top-k cell, as the SDK writes it


def _fill_topk(out, rows: list[list[tuple[int, float]] | None]) -> None:
    """Row-major `[len(rows), k]` id and logprob matrices; a missing row is all sentinel."""
    k = max((len(r) for r in rows if r), default=0)
    ids = np.zeros((len(rows), k), "<i4")
    lps = np.full((len(rows), k), MASK_LOGPROB, "<f4")
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or []):
            ids[i, j], lps[i, j] = token, logprob
    out.token_ids, out.logprobs, out.k, out.length = ids.tobytes(), lps.tobytes(), k, len(rows)


def _read_topk(msg) -> list[list[tuple[int, float]] | None]:
    ids = np.frombuffer(msg.token_ids, "<i4").reshape(msg.length, msg.k)
    lps = np.frombuffer(msg.logprobs, "<f4").reshape(msg.length, msg.k)
    rows: list[list[tuple[int, float]] | None] = []
    for row_ids, row_lps in zip(ids.tolist(), lps.tolist()):
        row = [(t, lp) for t, lp in zip(row_ids, row_lps) if lp != MASK_LOGPROB]
        rows.append(row or None)
    return rows


def encode_sample_response(response: SampleResponse) -> bytes:
    msg = MESSAGES["SampleResponse"](prompt_cache_hit_tokens=response.prompt_cache_hit_tokens)
    for seq in response.sequences:
        out = msg.sequences.add(
            stop_reason=_STOP_REASONS.index(seq.stop_reason),
            tokens=np.asarray(seq.tokens, "<i4").tobytes(),
        )
        if seq.logprobs is not None:
            out.logprobs = np.asarray(seq.logprobs, "<f4").tobytes()
        if seq.topk_logprobs is not None:
            _fill_topk(out.topk_sampled_logprobs, seq.topk_logprobs)
    if response.prompt_logprobs is not None:
        values = [np.nan if v is None else v for v in response.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, "<f4").tobytes()
    if response.topk_prompt_logprobs is not None:
        _fill_topk(msg.topk_prompt_logprobs, response.topk_prompt_logprobs)
    return msg.SerializeToString()


def decode_sample_response(body: bytes) -> SampleResponse:
    msg = MESSAGES["SampleResponse"]()
    msg.ParseFromString(body)
    sequences = []
    for seq in msg.sequences:
        sequences.append(
            SampledSequence(
                stop_reason=_STOP_REASONS[seq.stop_reason],
                tokens=np.frombuffer(seq.tokens, "<i4").tolist(),
                logprobs=np.frombuffer(seq.logprobs, "<f4").tolist()
                if seq.HasField("logprobs")
                else None,
                topk_logprobs=_read_topk(seq.topk_sampled_logprobs)
                if seq.HasField("topk_sampled_logprobs")
                else None,
            )
        )
    prompt_logprobs = None
    if msg.HasField("prompt_logprobs"):
        values = np.frombuffer(msg.prompt_logprobs, "<f4").tolist()
        prompt_logprobs = [None if np.isnan(v) else v for v in values]
    return SampleResponse(
        sequences=sequences,
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=_read_topk(msg.topk_prompt_logprobs)
        if msg.HasField("topk_prompt_logprobs")
        else None,
        prompt_cache_hit_tokens=msg.prompt_cache_hit_tokens,
    )
