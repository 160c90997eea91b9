"""`python -m skeleton_ds CMD ...`: the `skeleton-ds` command, where the console script is not on PATH."""

import sys

from skeleton_ds.cli import main

sys.exit(main())
