"""The code base stays ruff-clean (lint and format)."""

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout


def test_ruff_format():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout
