"""Shared by the benchmarks: describe the machine, and record figures in docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {device}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def record(name: str, body: str, on: str | None = None) -> None:
    """Replace (or add) the section `## name` of docs/benchmarks.md; `on`: the machine
    measured on, where it is not this one."""
    stamp = datetime.date.today().isoformat()
    section = f"## {name}\n\nMeasured {stamp} on: {on or machine()}\n\n{body.strip()}\n"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nWritten by `benchmarks/*.py`.\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else (text.rstrip() + "\n\n" + section)
    )
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text.rstrip() + "\n")
