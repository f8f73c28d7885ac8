"""`tinkerd serve`, except that saving a checkpoint called NAME stalls for SECONDS with
every file written, just before the rename that completes it: test_state.py kills the
server there. With TINKERD_TEST_STALL_AFTER=1 it stalls just after the rename instead
(the checkpoint is complete, its request not yet reported).
Usage: `python tests/stalled_save_server.py NAME SECONDS serve ARGS...`."""

import os
import sys
import time

from tinkerd.cli import main
from tinkerd.engine.checkpoints import CheckpointStore

name, seconds, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
move_into_place = CheckpointStore._move_into_place


def stalled(self, tmp, final, overwrite):
    after = os.environ.get("TINKERD_TEST_STALL_AFTER") == "1"
    if final.name == name and not after:
        time.sleep(seconds)
    result = move_into_place(self, tmp, final, overwrite)
    if final.name == name and after:
        time.sleep(seconds)
    return result


CheckpointStore._move_into_place = stalled
sys.exit(main(argv))
