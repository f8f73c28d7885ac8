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

from pydantic import ValidationError

from tinkerd import wire_proto
from tinkerd.errors import InvalidRequestError
from tinkerd.server.requests import JSON, PROTOBUF, encode_json
from tinkerd.server.schemas import ForwardBackwardJson

MAX_DECOMPRESSED_BYTES = 1 << 30
"""The most a compressed request body may expand to (a zstd bomb gets a 400)."""


def decompress(body: bytes, content_encoding: str | None) -> bytes:
    """The body with its Content-Encoding (zstd, gzip or none) undone."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
    elif encoding == "gzip":
        import gzip

        reader = gzip.GzipFile(fileobj=io.BytesIO(body))
    else:
        raise InvalidRequestError(f"unsupported Content-Encoding {content_encoding!r}")
    try:
        out = reader.read(MAX_DECOMPRESSED_BYTES + 1)
    except Exception as e:  # each codec raises its own error type
        raise InvalidRequestError(f"body is not valid {encoding}: {e}") from None
    if len(out) > MAX_DECOMPRESSED_BYTES:
        raise InvalidRequestError(f"body expands past {MAX_DECOMPRESSED_BYTES} bytes")
    return out


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
    except (ValueError, TypeError, KeyError):
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
