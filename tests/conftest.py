"""For every test: the clone's own state folder (.mlpe/, as `make` uses) unless one is set,
so that `pytest` run by hand finds the stack `make up` started. Nothing of mlpe is
imported here: the kernel tests also run against `pip install ./kernels` alone."""

import os
from pathlib import Path

os.environ.setdefault("MLPE_STATE_DIR", str(Path(__file__).resolve().parent.parent / ".mlpe"))
