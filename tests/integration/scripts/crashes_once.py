"""Does not use mlpe.sdk: exits 3 on its first attempt (after a few seconds), then 0.
Crash restarts must work for it all the same."""
import os
import sys
import time
from pathlib import Path

marker = Path(os.environ["MLPE_JOB_DIR"]) / f"crashed-{os.environ['RANK']}"
time.sleep(3)
if not marker.exists():
    marker.touch()
    print("first attempt: giving up", file=sys.stderr)
    sys.exit(3)
print("second attempt: fine")
