"""For every test: the clone's own state folder (.mlpe/, as `make` uses) unless one is set,
so that `pytest` run by hand finds the stack `make up` started."""

import os

from tests.helpers import REPO_ROOT

os.environ.setdefault("MLPE_STATE_DIR", str(REPO_ROOT / ".mlpe"))
