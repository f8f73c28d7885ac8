"""A bounded load test: concurrent official-SDK clients train and sample through a real
server in rounds of fresh sessions (the full version is benchmarks/load.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from load import run  # noqa: E402
from train_overhead import tinkerd_server  # noqa: E402


def test_concurrent_clients_all_finish_and_memory_levels_off():
    server: dict = {}
    with tinkerd_server("tinkerd/tiny", server) as url:
        result = run(url, server["pid"], clients=4, steps=2, rounds=3)
    assert result["failures"] == []
    assert len(result["latencies"]["train step"]) == 4 * 2 * 3
    assert len(result["latencies"]["save + sample 4x16"]) == 4 * 2 * 3
    # Ended sessions free their runs: after the first round, memory stays level.
    _, first, *later = result["rss"]
    assert max(later) < first + 64, result["rss"]
