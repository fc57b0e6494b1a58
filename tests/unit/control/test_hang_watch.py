"""The supervisor's hang watch: a rank is hung after hang_timeout_s without a step, but a
rank that is still starting (no report yet, or reported "starting": imports, rendezvous,
checkpoint load, the first collective) has the start-up grace on top."""

import time

from mlpe.control.supervisor import STARTUP_GRACE_S, Supervisor


class Recorder(Supervisor):
    def __init__(self):  # no store, no processes: only check_hang is exercised
        self.failures: list[str] = []

    async def failure(self, record, reason):
        self.failures.append(reason)


def record(launched_s_ago: float) -> dict:
    return {"resolved": {"world_size": 2, "hang_timeout_s": 8.0},
            "launch": {"launched_ns": time.time_ns() - int(launched_s_ago * 1e9)}}


def report(state: str, s_ago: float, step: int = 0) -> dict:
    return {"state": state, "step": step, "time_ns": time.time_ns() - int(s_ago * 1e9)}


async def test_a_rank_without_a_step_for_the_timeout_is_hung():
    watch = Recorder()
    await watch.check_hang(record(100), {0: report("running", 1, 12),
                                         1: report("running", 9, 11)})
    assert watch.failures == ["rank 1 made no progress for 9 s (hang_timeout_s 8)"]


async def test_starting_ranks_have_the_grace_before_their_first_step():
    watch = Recorder()
    slow_start = 8 + STARTUP_GRACE_S / 2
    await watch.check_hang(record(slow_start), {0: report("starting", slow_start - 1)})
    assert watch.failures == []  # rank 0 still starting, rank 1 not reported yet
    await watch.check_hang(record(100), {0: report("starting", STARTUP_GRACE_S + 9),
                                         1: report("running", 1, 3)})
    assert watch.failures == ["rank 0 made no progress for 9 s (hang_timeout_s 8)"]
