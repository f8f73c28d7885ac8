"""The examples run as a user would run them (shortened)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_custom_loss_regularizers_example_prints_the_breakdown():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_loss_regularizers.py"), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for term in ("base", "entropy", "len_nll", "total", "grad_norm"):
        assert term in result.stdout


def test_rl_basic_example_over_http(server):
    from conftest import KEYS

    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "rl_basic.py"),
            "--steps",
            "3",
            "--base-url",
            server.url,
            "--api-key",
            KEYS[0],
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "mean reward" in result.stdout
