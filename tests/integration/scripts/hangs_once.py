"""Reports steps through mlpe.sdk, and on its first attempt stops reporting at step 4
(a hang): the controller must restart it."""
import sys
import time

from mlpe import sdk

run = sdk.start(device="cpu")
marker = run.job_dir / "hung-once"
step = run.load({})
while step < 10:
    if run.poll().stop:
        break
    step += 1
    if step == 4 and not marker.exists():
        marker.touch()
        time.sleep(3600)
    time.sleep(0.05)
    run.report(step, loss=1.0 / step)
sys.exit(run.finish())
