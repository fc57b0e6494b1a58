"""Redis keys shared by the controller and its workers (one place, so they agree)."""

JOBS = "mlpe:jobs"            # sorted set: job id by submit time (ns)
QUEUE = "mlpe:queue"          # sorted set: queued job ids, lowest score runs first
AUDIT = "mlpe:audit"          # stream: every state-changing call (who, what, when)
SEQ = "mlpe:job-seq"          # counter: submit order, breaks priority ties


def job(job_id: str) -> str:
    """hash: spec (JSON), state, step, restarts, times, message, launch (pid, start time)."""
    return f"mlpe:job:{job_id}"


def ranks(job_id: str) -> str:
    """hash: rank -> JSON progress {step, time_ns, pid, loss, …}, written by each worker."""
    return f"mlpe:job:{job_id}:ranks"


def control(job_id: str) -> str:
    """hash: pause (0/1), stop (0/1), checkpoint (request counter), read by rank 0."""
    return f"mlpe:job:{job_id}:control"


def events(job_id: str) -> str:
    """stream: the job's events (state changes, steps, checkpoints, restarts)."""
    return f"mlpe:job:{job_id}:events"
