"""`python -m mlpe.cli` is the `mlpe` command (how mlpe starts its own subprocesses)."""

import sys

from mlpe.cli import main

sys.exit(main())
