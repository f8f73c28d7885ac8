"""Every encoding a released `tinker` SDK speaks, in and out.

Requests to forward_backward arrive as protobuf (`Content-Type: application/x-protobuf`,
SDK 0.18 and later when client/config asks for it; 0.26 and later always) or as JSON
(`application/json`: every SDK before 0.18, and 0.18-0.25 unless told otherwise), the
protobuf optionally zstd-compressed (`Content-Encoding: zstd`, SDK 0.22 and later when
`proto_compress_fwdbwd` is set). A body without a Content-Type is taken as protobuf.

Results of forward_backward and asample are stored as protobuf. `retrieve_future`
answers protobuf to a caller whose `Accept` names it (or `*/*`, or no Accept at all),
and JSON to one that asks for JSON only: SDKs before 0.18 take only JSON, and later
ones ask for protobuf only for the result types they can parse.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

from pydantic import ValidationError

from tinkerd import wire_proto
from tinkerd.errors import InvalidRequestError
from tinkerd.server.requests import JSON, PROTOBUF, encode_json
from tinkerd.server.schemas import ForwardBackwardJson

MAX_DECOMPRESSED_BYTES = 1 << 30
"""The most a compressed request body may expand to (a zstd bomb gets a 400)."""
BYTES_PER_TOKEN = 1024
"""Request bytes a token may need: its 4-byte id, and per-token loss inputs as wide as
`[seq_len, 32]` int64 targets with four float32 inputs beside them (768 bytes)."""
_PREFIX = 1 << 16  # bytes of a broken body kept to read which run it names


class BodyError(InvalidRequestError):
    """A request body that cannot be decoded. `model_id`/`seq_id`: the run it names, if
    its first bytes say (so its seq_id can be used up rather than hold the run back)."""

    model_id: str | None = None
    seq_id: int | None = None
    partial: bytes = b""
    """The first bytes a broken compressed body did expand to."""


def body_limit(max_batch_tokens: int) -> int:
    """Bytes a forward_backward body may hold once decompressed: what a request at the
    server's batch-token limit can need, at most MAX_DECOMPRESSED_BYTES."""
    return min(MAX_DECOMPRESSED_BYTES, max_batch_tokens * BYTES_PER_TOKEN)


def decompress(
    body: bytes, content_encoding: str | None, limit: int = MAX_DECOMPRESSED_BYTES
) -> bytes:
    """The body with its Content-Encoding (zstd, gzip or none) undone, expanded a piece at
    a time: past `limit` bytes, or truncated, or not of its encoding, it is a BodyError
    (and nothing larger than `limit` plus one piece was ever held)."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "zstd":
        pieces = _zstd_pieces(body, limit)
    elif encoding == "gzip":
        pieces = _gzip_pieces(body)
    else:
        raise InvalidRequestError(f"unsupported Content-Encoding {content_encoding!r}")
    out = io.BytesIO()  # grows in place; getvalue() hands its buffer over without a copy
    try:
        for piece in pieces:
            out.write(piece)
            if out.tell() > limit:
                raise BodyError(f"body expands past {limit} bytes, more than this server takes")
    except BodyError as e:
        e.partial = out.getbuffer()[:_PREFIX].tobytes()
        raise
    except Exception as e:  # each codec raises its own error type
        error = BodyError(f"body is not valid {encoding}: {e}")
        error.partial = out.getbuffer()[:_PREFIX].tobytes()
        raise error from None
    return out.getvalue()


def _zstd_pieces(body: bytes, limit: int) -> Iterator[bytes]:
    """Decompressed pieces of zstd frames end to end. Input goes in small steps so no
    piece is much over what the limit has left: a zstd block expands at most ~32,768x."""
    import zstandard

    view, pos, produced = memoryview(body), 0, 0
    while True:
        frame = zstandard.ZstdDecompressor().decompressobj()
        while not frame.eof:
            if pos >= len(view):
                raise BodyError("body is not valid zstd: the frame is truncated")
            step = min(1 << 20, max(64, (limit - produced) >> 15))
            piece = frame.decompress(view[pos : pos + step])
            pos += step
            produced += len(piece)
            yield piece
        pos -= len(frame.unused_data)  # the next frame's first bytes, if any
        if pos >= len(view):
            return


def _gzip_pieces(body: bytes) -> Iterator[bytes]:
    """Decompressed pieces (1 MiB each at most) of gzip members end to end."""
    import zlib

    data = body
    while True:
        member = zlib.decompressobj(wbits=31)
        while not member.eof:
            if not data:
                raise BodyError("body is not valid gzip: it is truncated")
            yield member.decompress(data, 1 << 20)
            data = member.unconsumed_tail
        data = member.unused_data
        if not data:
            return


def decode_loss_body(
    raw: bytes,
    content_encoding: str | None,
    content_type: str | None,
    forward_only: bool,
    max_tokens: int,
) -> dict:
    """A forward_backward (or, `forward_only`, a JSON /forward) request body as sent ->
    dict(model_id, seq_id, data, loss_fn, loss_fn_config, forward_only). Decoded
    protobuf tensors stay numpy arrays, and the decompressed body is dropped once parsed,
    so memory peaks near twice the tensors' bytes. A refusal is a BodyError or
    ProtoDecodeError naming the run where the body does."""
    is_json = "json" in (content_type or "").lower()
    try:
        body = decompress(raw, content_encoding, body_limit(max_tokens))
    except BodyError as e:
        if not is_json:
            e.model_id, e.seq_id = wire_proto.leading_run_and_seq(e.partial or raw)
        raise
    if is_json:
        try:
            return decode_loss_request(body, content_type, forward_only)
        except InvalidRequestError as e:
            error = BodyError(str(e))
            error.model_id, error.seq_id = run_and_seq(body) or (None, None)
            raise error from None
    try:
        msg = wire_proto.parse_forward_backward_request(body)
    except wire_proto.ProtoDecodeError as e:
        e.model_id, e.seq_id = wire_proto.leading_run_and_seq(body[:_PREFIX])
        raise
    del body  # the message holds its own copy: drop this one before tensors are read
    return wire_proto.request_from_message(msg, max_tokens)


def decode_loss_request(body: bytes, content_type: str | None, forward_only: bool) -> dict:
    """A forward_backward (or, `forward_only`, a JSON /forward) request in either encoding
    -> dict(model_id, seq_id, data, loss_fn, loss_fn_config, forward_only)."""
    if "json" not in (content_type or "").lower():
        return wire_proto.decode_forward_backward_request(body)
    try:
        req = ForwardBackwardJson.model_validate_json(body)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise InvalidRequestError("; ".join(lines)) from None
    given = req.forward_input if forward_only else req.forward_backward_input
    if given is None:
        field = "forward_input" if forward_only else "forward_backward_input"
        raise InvalidRequestError(f"{field}: Field required")
    return dict(
        model_id=req.model_id,
        seq_id=req.seq_id,
        data=given.data,
        loss_fn=given.loss_fn,
        loss_fn_config=given.loss_fn_config,
        forward_only=forward_only,
    )


def run_and_seq(body: bytes) -> tuple[str, int] | None:
    """(model_id, seq_id) of a JSON request that failed validation, if it names them, so
    its seq_id can be used up rather than hold the run's later requests back."""
    try:
        fields = json.loads(body)
        model_id, seq_id = fields["model_id"], fields["seq_id"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if isinstance(model_id, str) and type(seq_id) is int:
        return model_id, seq_id
    return None


def takes_protobuf(accept: str | None) -> bool:
    accept = (accept or "*/*").lower()
    return PROTOBUF in accept or "*/*" in accept


def for_caller(kind: str, content_type: str | None, body: bytes, accept: str | None):
    """(content type, body) of a stored result in the encoding the caller accepts."""
    if content_type != PROTOBUF or takes_protobuf(accept):
        return content_type or JSON, body
    if kind == "sample":
        return encode_json(wire_proto.decode_sample_response(body))
    return encode_json(wire_proto.decode_forward_backward_output(body))
