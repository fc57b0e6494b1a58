"""The launcher (`python -m mlpe.worker.launch`, a job as a JSON line on stdin): torchrun's
environment in every rank, one failing rank stops the others and names itself, a
preempted rank's peers get to finish their emergency checkpoint."""

import json
import subprocess
import sys
import time


def launch(tmp_path, script: str, nproc: int = 2, args=()) -> tuple[int, dict, float]:
    path = tmp_path / "job.py"
    path.write_text(script)
    job = {"job_id": "job-test", "job_dir": str(tmp_path), "log_dir": str(tmp_path / "logs"),
           "nproc": nproc, "script": str(path), "args": list(args),
           "env": {"GREETING": "hello"}}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mlpe.worker.launch"],
                          input=json.dumps(job) + "\n", capture_output=True, text=True,
                          timeout=120)
    ranks = json.loads((tmp_path / "logs" / "ranks.json").read_text())
    return done.returncode, ranks, time.monotonic() - t0


def test_every_rank_gets_torchruns_environment_and_its_args(tmp_path):
    code, ranks, _ = launch(tmp_path, """
import os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RUN_ID", "MLPE_JOB_ID", "MLPE_JOB_DIR", "GREETING")
print({k: os.environ[k] for k in keys}, sys.argv[1:], os.getcwd())
""", args=["--lr", "3e-4"])
    assert code == 0 and set(ranks["ranks"]) == {"0", "1"} and "failure" not in ranks
    for rank in (0, 1):
        out = (tmp_path / "logs" / f"rank-{rank}.log").read_text()
        assert f"'RANK': '{rank}'" in out and "'WORLD_SIZE': '2'" in out
        assert "'MLPE_JOB_ID': 'job-test'" in out and "'GREETING': 'hello'" in out
        assert "['--lr', '3e-4']" in out and str(tmp_path) in out


def test_a_failing_rank_stops_the_others_and_is_named(tmp_path):
    code, ranks, seconds = launch(tmp_path, """
import os, sys, time
if os.environ["RANK"] == "1":
    raise ValueError("rank one gives up")
time.sleep(600)
""")
    assert code == 1 and seconds < 60  # rank 0 was not left sleeping
    assert ranks["failure"]["rank"] == 1 and ranks["failure"]["exit_code"] == 1
    assert "ValueError: rank one gives up" in (tmp_path / "logs" / "rank-1.log").read_text()


def test_a_preempted_ranks_peers_finish_their_checkpoint(tmp_path):
    code, ranks, _ = launch(tmp_path, """
import os, sys, time
from pathlib import Path
if os.environ["RANK"] == "1":
    time.sleep(1.5)  # still writing its emergency checkpoint
    Path(os.environ["MLPE_JOB_DIR"], "rank-1-saved").touch()
sys.exit(143)
""")
    assert code == 143 and ranks["failure"]["exit_code"] == 143
    assert (tmp_path / "rank-1-saved").exists()  # not SIGKILLed in the meantime
