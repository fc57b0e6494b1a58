"""`mlpe bench recovery`: a job whose worker is SIGKILLed at a random step, against the
same job uninterrupted.

Runs a fresh `mlpe control` (own Redis namespace, temporary jobs folder) on the local
stack. Measures: seconds from the kill to the first step completed by the restarted
workers; steps lost beyond the last checkpoint (checkpoint at the kill minus the step
resumed from: 0 when the newest good checkpoint is used); the training stall of each
checkpoint save (the CPU copy; the write is in the background); and whether the final
weights and the whole loss curve (every rank's TrainStep losses on Kafka) are bitwise
those of the uninterrupted run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path

from mlpe.common.settings import Settings


def register(sub) -> None:
    p = sub.add_parser("recovery", help="SIGKILL a training worker at a random step: "
                       "time to recover, steps lost, checkpoint stall, exact match",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny)")
    p.add_argument("--steps", type=int, default=150, help="steps per run (150)")
    p.add_argument("--world-size", type=int, default=2, help="ranks (2)")
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every N steps (10)")
    p.add_argument("--seed", type=int, default=None, help="picks the kill step and rank")
    p.set_defaults(bench=run)


def _spec(args):
    from mlpe.v1 import control_pb2 as c

    return c.JobSpec(model=c.ModelSpec(preset=args.preset), steps=args.steps,
                     world_size=args.world_size, micro_batch=2,
                     global_batch=4 * args.world_size, max_restarts=1, device="cpu",
                     checkpoint=c.CheckpointPolicy(every_steps=args.ckpt_every, keep=3))


async def _losses(bootstrap: str, marks: dict, job_id: str, expected: int) -> dict:
    """{(rank, step): loss} of the job's TrainSteps after `marks` (the last value per
    step: a step redone after the restart overwrites the one lost with the crash)."""
    from aiokafka import AIOKafkaConsumer

    from mlpe.v1 import training_pb2

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    consumer.assign(list(marks))
    for tp, offset in marks.items():
        consumer.seek(tp, offset)
    losses: dict[tuple[int, int], float] = {}
    try:
        async with asyncio.timeout(60):
            while len(losses) < expected:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        if r.key == job_id.encode():
                            s = training_pb2.TrainStep.FromString(r.value)
                            if not s.halt:  # a rank stopping on purpose, not a step
                                losses[(s.rank, s.step)] = s.loss
    except TimeoutError:
        pass  # compared as they are: a missing step is a mismatch
    finally:
        await consumer.stop()
    return losses


async def _end_offsets(bootstrap: str) -> dict:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from mlpe.common.topics import TRAIN_EVENTS

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(TRAIN_EVENTS.name, p) for p in range(TRAIN_EVENTS.partitions)]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        return {tp: await consumer.position(tp) for tp in parts}
    finally:
        await consumer.stop()


def run(args, settings: Settings) -> dict:
    import torch

    from mlpe import stack
    from mlpe.control.local import LocalController
    from mlpe.v1 import control_pb2 as c

    if args.steps < 3 * args.ckpt_every:
        raise RuntimeError(f"--steps {args.steps} must be at least 3 x --ckpt-every "
                           f"({args.ckpt_every}) so the kill falls between checkpoints")
    rng = random.Random(args.seed)
    stack.up(settings, ("kafka", "redis"))
    with tempfile.TemporaryDirectory(prefix="mlpe-bench-recovery-") as tmp:
        control = LocalController(settings.redis_url, settings.kafka_bootstrap, Path(tmp),
                                  slots=args.world_size)
        control.start()
        try:
            marks = asyncio.run(_end_offsets(settings.kafka_bootstrap))
            print(f"uninterrupted run: {args.steps} steps, {args.world_size} ranks, "
                  f"checkpoint every {args.ckpt_every}", flush=True)
            clean = control.submit(_spec(args))
            control.wait_state(clean.job_id, c.JOB_STATE_COMPLETED, timeout=1800)
            stalls = control.progress(clean.job_id)[0].get("stalls_ms", [])

            kill_step = rng.randint(args.ckpt_every + 1, args.steps - args.ckpt_every - 1)
            rank = rng.randrange(args.world_size)
            crashed = control.submit(_spec(args))
            victim = control.wait_step(crashed.job_id, rank, kill_step, timeout=600)
            ckpt_at_kill = max(p.get("checkpoint_step", 0)
                               for p in control.progress(crashed.job_id).values())
            os.kill(victim["pid"], signal.SIGKILL)
            killed = time.monotonic()
            print(f"killed rank {rank} (pid {victim['pid']}) at step {victim['step']}; last "
                  f"checkpoint {ckpt_at_kill}", flush=True)

            def first_new_step():
                p = control.progress(crashed.job_id).get(0)
                return p and p["pid"] != victim["pid"] and p["step"] > p["resumed_from"] and \
                    p.get("state") == "running" and p
            resumed = control.wait("the first step after the restart", first_new_step,
                                   timeout=300, poll_s=0.02)
            recovery_s = time.monotonic() - killed
            done = control.wait_state(crashed.job_id, c.JOB_STATE_COMPLETED, timeout=1800)

            a = control.checkpoint_state(clean.job_id, args.steps)["model"]
            b = control.checkpoint_state(crashed.job_id, args.steps)["model"]
            weights_match = all(torch.equal(a[k], b[k]) for k in a)
            expected = args.steps * args.world_size
            curves = [asyncio.run(_losses(settings.kafka_bootstrap, marks, j.job_id,
                                          expected)) for j in (clean, crashed)]
            curve_match = len(curves[0]) == expected and curves[0] == curves[1]
        finally:
            control.stop()
    steps_lost = max(0, ckpt_at_kill - resumed["resumed_from"])
    result = {
        "bench": "recovery", "kill_to_first_step_s": round(recovery_s, 2),
        "steps_lost": steps_lost, "exact_match": weights_match and curve_match,
        "weights_match": weights_match, "loss_curve_match": curve_match,
        "ckpt_stall_ms": round(statistics.median(stalls), 2) if stalls else None,
        "ckpt_stall_ms_max": round(max(stalls), 2) if stalls else None,
        "checkpoints": len(stalls), "kill_step": victim["step"], "killed_rank": rank,
        "resumed_from": resumed["resumed_from"], "restarts": done.restarts,
        "steps": args.steps, "world_size": args.world_size, "preset": args.preset}
    print(f"recovered in {recovery_s:.2f} s (kill → first new step), resumed from step "
          f"{resumed['resumed_from']}, {steps_lost} steps lost beyond the last checkpoint; "
          f"checkpoint stall p50 {result['ckpt_stall_ms']} ms; exact match: "
          f"{result['exact_match']} (weights {weights_match}, loss curve {curve_match})")
    return result
