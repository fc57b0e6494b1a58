"""Redis keys shared by the controller and its workers (one place, so they agree).

MLPE_CONTROL_NAMESPACE (default "mlpe") prefixes them all: controllers sharing one Redis
(tests, several teams) keep apart. Workers inherit it from the controller's environment.
"""

import os

NS = os.environ.get("MLPE_CONTROL_NAMESPACE", "mlpe").strip() or "mlpe"
JOBS = f"{NS}:jobs"            # sorted set: job id by submit time (ns)
QUEUE = f"{NS}:queue"          # sorted set: queued job ids, lowest score runs first
AUDIT = f"{NS}:audit"          # stream: every state-changing call (who, what, when)
SEQ = f"{NS}:job-seq"          # counter: submit order, breaks priority ties


def job(job_id: str) -> str:
    """hash: spec (JSON), state, step, restarts, times, message, launch (pid, start time)."""
    return f"{NS}:job:{job_id}"


def ranks(job_id: str) -> str:
    """hash: rank -> JSON progress {step, time_ns, pid, loss, …}, written by each worker."""
    return f"{NS}:job:{job_id}:ranks"


def control(job_id: str) -> str:
    """hash: pause (0/1), stop (0/1), checkpoint (request counter), read by rank 0."""
    return f"{NS}:job:{job_id}:control"


def events(job_id: str) -> str:
    """stream: the job's events (state changes, steps, checkpoints, restarts)."""
    return f"{NS}:job:{job_id}:events"
