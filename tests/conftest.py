import os
import tempfile

# The built-in model is made once per test session in a private cache (never ~/.cache),
# before anything imports the engine.
os.environ.setdefault("TINKERD_CACHE", tempfile.mkdtemp(prefix="tinkerd-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything

import pytest  # noqa: E402

from tinkerd.engine.trainer import Engine  # noqa: E402
from tinkerd.types import Datum, ModelInput  # noqa: E402

TINY = "tinkerd/tiny"


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine()


def make_datum(tokens: list[int], weights: list[float] | None = None) -> Datum:
    """Next-token datum over `tokens` (input = tokens[:-1], targets = tokens[1:])."""
    n = len(tokens) - 1
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "weights": weights if weights is not None else [1.0] * n,
        },
    )


@pytest.fixture
def batch() -> list[Datum]:
    """Three data of different lengths (exercises padding)."""
    return [
        make_datum([256, *b"hello world"]),
        make_datum([256, *b"abc"], [0.0, 1.0, 1.0]),
        make_datum([256, *b"tinkerd trains lora"]),
    ]
