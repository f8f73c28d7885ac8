"""Checkpoint names and `tinker://` paths: plain strings, no torch.

The HTTP client, the CLI and the server split and check paths with these without loading
the engine.
"""

from __future__ import annotations

import re

from tinkerd.errors import InvalidRequestError

KINDS = ("weights", "sampler_weights", "external_weights")
"""Tinker path segment: "weights" is training state, "sampler_weights" is for sampling,
"external_weights" is an adapter exported for use outside tinkerd (save_weights_external)."""
SCHEME = "tinker://"
MAX_NAME_LENGTH = 128
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
MODEL_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")  # tinker's own model ids contain ':'


def check_part(what: str, value: str, pattern: re.Pattern) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"checkpoint {what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidRequestError(f"checkpoint {what} is longer than {MAX_NAME_LENGTH} characters")
    if value.startswith(".") or ".." in value or not pattern.fullmatch(value):
        raise InvalidRequestError(
            f"invalid checkpoint {what} {value!r}: use letters, digits, '.', '_' and '-', "
            "not starting with '.' and without '..'"
        )


def check_names(model_id: str, kind: str, name: str) -> None:
    check_part("model_id", model_id, MODEL_ID_RE)
    if kind not in KINDS:
        raise InvalidRequestError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    check_part("name", name, NAME_RE)


def tinker_path(model_id: str, kind: str, name: str) -> str:
    """`tinker://<model_id>/<kind>/<name>`."""
    check_names(model_id, kind, name)
    return f"{SCHEME}{model_id}/{kind}/{name}"


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """(model_id, kind, name) of a `tinker://<model_id>/<kind>/<name>` path."""
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise InvalidRequestError(f"checkpoint path must start with {SCHEME!r}, got {path!r}")
    parts = path[len(SCHEME) :].split("/")
    if len(parts) != 3:
        raise InvalidRequestError(
            f"checkpoint path must look like {SCHEME}<model_id>/<kind>/<name>, got {path!r}"
        )
    check_names(*parts)
    return parts[0], parts[1], parts[2]
