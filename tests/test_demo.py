"""`tinkerd demo` really fine-tunes: held-out loss falls (short run here; the full run is
the README's main job)."""

import subprocess
import sys

from tinkerd.client import ServiceClient
from tinkerd.client.transport import InProcessTransport
from tinkerd.demo import run_demo


def test_demo_learns_to_reverse_words(engine, capsys):
    service = ServiceClient(transport=InProcessTransport(engine=engine))
    before, after = run_demo(steps=80, service=service, progress=False, held_out=50)
    assert before.accuracy == 0.0
    assert after.loss_per_token < 0.4 * before.loss_per_token
    printed = capsys.readouterr().out
    assert "before: held-out loss" in printed and "after:  held-out loss" in printed


def test_cli_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "tinkerd.cli", "demo", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--steps" in result.stdout
