"""A bounded load test: concurrent official-SDK clients train and sample through a real
server in rounds of fresh sessions (the full version, with a report, is benchmarks/load.py)."""

import re
import threading
import traceback
from pathlib import Path

import tinker
from helpers import KEYS, TINY
from tinker import types


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024


def one_client(url: str, steps: int, seed: int, counts: dict, failures: list) -> None:
    """Train `steps` steps and sample from each step's weights, as a Tinker user would."""
    try:
        service = tinker.ServiceClient(base_url=url, api_key=KEYS[0])
        client = service.create_lora_training_client(base_model=TINY, rank=8, seed=seed).result()
        tokens = [256, *f"load test client {seed} says hello".encode()]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=seed)
        for _ in range(steps):
            client.forward_backward([datum], "cross_entropy")
            client.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            counts["train step"].append(seed)
            sampler = client.save_weights_and_get_sampling_client().result()
            sampler.sample(types.ModelInput.from_ints(tokens[:4]), 4, params).result()
            counts["save + sample 4x16"].append(seed)
        service.close("success").result()
    except Exception:  # noqa: BLE001 -- a failure is a result here, asserted on below
        failures.append(traceback.format_exc(limit=3))


def test_concurrent_clients_all_finish_and_memory_levels_off(server):
    clients, steps, rounds = 4, 2, 3
    counts: dict[str, list[int]] = {"train step": [], "save + sample 4x16": []}
    failures: list[str] = []
    rss = [rss_mib(server.proc.pid)]
    for r in range(rounds):
        threads = [
            threading.Thread(
                target=one_client, args=(server.url, steps, r * clients + i, counts, failures)
            )
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss.append(rss_mib(server.proc.pid))
    assert failures == []
    assert len(counts["train step"]) == 4 * 2 * 3
    assert len(counts["save + sample 4x16"]) == 4 * 2 * 3
    # Ended sessions free their runs: after the first round, memory stays level.
    _, first, *later = rss
    assert max(later) < first + 64, rss
