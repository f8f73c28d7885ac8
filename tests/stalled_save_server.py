"""`tinkerd serve`, except that saving a checkpoint called NAME stalls for SECONDS with
every file written, just before the rename that completes it: test_state.py kills the
server there. Usage: `python tests/stalled_save_server.py NAME SECONDS serve ARGS...`."""

import sys
import time

from tinkerd.cli import main
from tinkerd.engine.checkpoints import CheckpointStore

name, seconds, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
move_into_place = CheckpointStore._move_into_place


def stalled(self, tmp, final, overwrite):
    if final.name == name:
        time.sleep(seconds)
    return move_into_place(self, tmp, final, overwrite)


CheckpointStore._move_into_place = stalled
sys.exit(main(argv))
