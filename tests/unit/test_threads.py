"""OpenMP's wait policy (`tinkerd.threads`): passive unless the user chose one, set before
torch loads by the engine (embedded use) and by the `tinkerd` command."""

import os
import subprocess
import sys

SHOW = "import os\n{}\nprint(os.environ.get('OMP_WAIT_POLICY'))"


def policy(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", SHOW.format(code)],
        env=clean | env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return out.stdout.split()[-1]


def test_the_engine_chooses_a_passive_wait_before_torch_loads():
    assert policy("import tinkerd.engine") == "PASSIVE"
    cli = "from tinkerd.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert policy(cli) == "PASSIVE"


def test_a_users_choice_or_a_loaded_torch_is_left_alone():
    assert policy("import tinkerd.engine", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert policy("import tinkerd.engine", GOMP_SPINCOUNT="1000") == "None"
    assert policy("import torch, tinkerd.engine") == "None"  # too late for libgomp
