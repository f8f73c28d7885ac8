"""`python -m tinkerd.cli ...`: the same as the `tinkerd` command."""

import sys

from tinkerd.cli import main

sys.exit(main())
