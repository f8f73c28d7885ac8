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


def test_rl_demo_raises_the_reward(engine, capsys):
    """GRPO with the sampler's logprobs: reward (distinct lowercase letters) rises from
    the random model's ~0.1 within 15 steps."""
    from tinkerd.rl_demo import reward, run_rl_demo

    assert reward([ord("a"), ord("b"), ord("a"), 0]) == 0.5  # 2 distinct of 4 tokens
    service = ServiceClient(transport=InProcessTransport(engine=engine))
    rewards = run_rl_demo(steps=15, service=service, progress=False)
    assert sum(rewards[:3]) / 3 < 0.2
    assert sum(rewards[-3:]) / 3 > 0.35
    assert "mean reward" in capsys.readouterr().out
