"""Compressed-body bombs against `tinkerd serve`: peak RSS growth per MiB expanded.

A protobuf forward_backward whose datum carries an all-zero float32 `weights` tensor of
N MiB (3 tokens) compresses with zstd to a few KB. For each N the server's peak RSS is
reset (`/proc/PID/clear_refs`), the body is posted and its answer awaited, and the peak's
growth over the RSS before is divided by N: the baseline is the tensor's own bytes, so
1.0 would mean no copy at all. The same script measures any checkout (run it from one).

    python benchmarks/decode_memory.py --mib 16 64 256
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import httpx
import zstandard
from _report import record
from train_overhead import BENCH_KEY, tinkerd_server

from tinkerd import wire_proto
from tinkerd.types import Datum, ModelInput

TINY = "tinkerd/tiny"


def status_mib(pid: int, field: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text)[1]) / 1024


def bomb(model_id: str, seq_id: int, mib: int) -> bytes:
    datum = Datum(
        model_input=ModelInput.from_ints([256, 1, 2]),
        loss_fn_inputs={"target_tokens": [1, 2, 3], "weights": [1.0, 1.0, 1.0]},
    )
    body = wire_proto.encode_forward_backward_request(
        model_id, seq_id, [datum], "cross_entropy", None, False
    )
    msg = wire_proto.MESSAGES["ForwardBackwardRequest"]()
    msg.ParseFromString(body)
    weights = msg.data[0].loss_fn_inputs["weights"]
    weights.ClearField("shape")
    weights.dense = bytes(mib << 20)
    return zstandard.ZstdCompressor().compress(msg.SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    info: dict = {}
    rows = []
    with tinkerd_server(TINY, info) as url:
        pid = info["pid"]
        http = httpx.Client(base_url=f"{url}/api/v1", headers={"X-API-Key": BENCH_KEY}, timeout=600)

        def answer(response: httpx.Response) -> int:
            if response.status_code != 200:
                return response.status_code
            request_id = response.json()["request_id"]
            while (
                got := http.post("/retrieve_future", json={"request_id": request_id})
            ).status_code == 408:
                pass
            return got.status_code

        session = http.post("/create_session", json={}).json()["session_id"]
        body = {
            "session_id": session,
            "model_seq_id": 0,
            "base_model": TINY,
            "lora_config": {"rank": 4},
        }
        created = http.post("/create_model", json=body)
        while (got := http.post("/retrieve_future", json=created.json())).status_code == 408:
            pass
        model_id = got.json()["model_id"]
        headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
        for seq, mib in enumerate(args.mib, start=1):
            raw = bomb(model_id, seq, mib)
            time.sleep(1)  # let the lane go idle and trim its heap
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak := current RSS
            before = status_mib(pid, "VmRSS")
            status = answer(http.post("/forward_backward", content=raw, headers=headers))
            growth = status_mib(pid, "VmHWM") - before
            rows.append((mib, len(raw), status, growth))
            print(f"{mib} MiB in {len(raw)} B: HTTP {status}, peak +{growth:.0f} MiB")
    table = "\n".join(
        f"| {mib} | {size:,} | {status} | {growth:,.0f} | {growth / mib:.2f} |"
        for mib, size, status, growth in rows
    )
    sizes = " ".join(map(str, args.mib))
    report = f"""`python benchmarks/decode_memory.py --mib {sizes}`: a protobuf
forward_backward whose datum has an all-zero float32 `weights` tensor of N MiB (3 tokens),
zstd-compressed, posted to `tinkerd serve`; the server's peak RSS growth (VmHWM after the
answer minus VmRSS before, the peak reset first) per MiB expanded.

| MiB expanded | bytes sent | answer | peak growth MiB | MiB per MiB |
|---|---|---|---|---|
{table}
"""
    print(report)
    if not args.no_record:
        record("compressed-body bombs (tinkerd/tiny)", report)


if __name__ == "__main__":
    main()
