"""The examples run as a user would run them (shortened): each script as `__main__` with its
command line, in this process (a subprocess would only import torch again)."""

import runpy

import torch
from helpers import KEYS, ROOT


def run_example(name: str, *argv: str, monkeypatch) -> None:
    """`python examples/<name> <argv...>`; raises whatever the script raises."""
    script = str(ROOT / "examples" / name)
    monkeypatch.setattr("sys.argv", [script, *argv])
    with torch.random.fork_rng():  # a script may seed torch: leave the tests' RNG as it was
        runpy.run_path(script, run_name="__main__")


def test_custom_loss_regularizers_example_prints_the_breakdown(capsys, monkeypatch):
    run_example("custom_loss_regularizers.py", "--steps", "2", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    for term in ("base", "entropy", "len_nll", "total", "grad_norm"):
        assert term in out


def test_rl_basic_example_over_http(server, capsys, monkeypatch):
    argv = ("--steps", "3", "--base-url", server.url, "--api-key", KEYS[0])
    run_example("rl_basic.py", *argv, monkeypatch=monkeypatch)
    assert "mean reward" in capsys.readouterr().out
