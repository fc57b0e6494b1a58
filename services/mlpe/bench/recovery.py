"""`mlpe bench recovery`: a job whose rank is SIGKILLed at a random step, against the
same job uninterrupted — the built-in model, or a script (`--script FILE -- ARGS`).

Runs a fresh `mlpe control` (own Redis namespace, temporary jobs folder) on the local
stack; one uninterrupted run, then `--runs` killed ones (seeds seed, seed+1, …, each
picking the kill step and rank). Measures per run: seconds from the kill to the first
step completed by the restarted ranks; steps lost beyond the last checkpoint (the
newest good checkpoint on disk at the kill minus the step resumed from: 0 when it is
used); the training stall of each checkpoint save; and whether the final weights and
the whole loss curve (every rank's TrainStep losses on Kafka, read until every rank's
"completed" halt) are bitwise those of the uninterrupted run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mlpe.common.settings import Settings


def register(sub) -> None:
    p = sub.add_parser("recovery", help="SIGKILL a training rank at a random step: "
                       "time to recover, steps lost, checkpoint stall, exact match",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--script", type=Path, default=None,
                   help="a training script on mlpe.sdk (default: the built-in model); "
                   "its arguments after --")
    p.add_argument("script_args", nargs="*", metavar="-- ARGS",
                   help="the script's own arguments")
    p.add_argument("--preset", default="tiny", help="built-in model preset (tiny)")
    p.add_argument("--steps", type=int, default=150,
                   help="steps per run (150; passed to a script as --steps)")
    p.add_argument("--world-size", type=int, default=2, help="ranks (2)")
    p.add_argument("--ckpt-every", type=int, default=10,
                   help="checkpoint every N steps (10; a script gets it as --ckpt-every)")
    p.add_argument("--runs", type=int, default=1, help="killed runs (1), one seed each")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the first killed run (picks the kill step and rank)")
    p.set_defaults(bench=run)


def _spec(args):
    from mlpe.v1 import control_pb2 as c

    common = dict(world_size=args.world_size, max_restarts=1, device="cpu",
                  checkpoint=c.CheckpointPolicy(every_steps=args.ckpt_every, keep=3))
    if args.script is None:
        return c.JobSpec(model=c.ModelSpec(preset=args.preset), steps=args.steps,
                         micro_batch=2, global_batch=4 * args.world_size, **common)
    script_args = ["--steps", str(args.steps), "--ckpt-every", str(args.ckpt_every),
                   *args.script_args]
    return c.JobSpec(name=args.script.name, steps=args.steps, entrypoint=c.Entrypoint(
        script=str(args.script.resolve()), args=script_args), **common)


async def _losses(bootstrap: str, marks: dict, job_id: str, ranks: int) -> dict:
    """{(rank, step): [losses]} of the job's TrainSteps after `marks`, read until every
    rank's "completed" halt (its last message) or 60 s without one."""
    from aiokafka import AIOKafkaConsumer

    from mlpe.v1 import training_pb2

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    consumer.assign(list(marks))
    for tp, offset in marks.items():
        consumer.seek(tp, offset)
    losses: dict[tuple[int, int], list[float]] = {}
    done: set[int] = set()
    try:
        async with asyncio.timeout(60):
            while len(done) < ranks:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        if r.key != job_id.encode():
                            continue
                        s = training_pb2.TrainStep.FromString(r.value)
                        if s.halt == "completed":
                            done.add(s.rank)
                        elif not s.halt:  # a rank stopping on purpose, not a step
                            losses.setdefault((s.rank, s.step), []).append(s.loss)
    except TimeoutError:
        pass  # compared as they are: a missing step is a mismatch
    finally:
        await consumer.stop()
    return losses


def _curve(losses: dict) -> dict:
    """The last loss published per (rank, step): a step redone after a restart replaces
    the one the crash interrupted (they are equal when training is deterministic)."""
    return {key: values[-1] for key, values in losses.items()}


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


def _weights(control, job_id: str, step: int) -> dict:
    return control.checkpoint_state(job_id, step)["model"]


def _killed_run(control, args, settings, seed, marks, clean_weights, clean_curve) -> dict:
    import torch

    from mlpe.sdk import checkpoint
    from mlpe.v1 import control_pb2 as c

    rng = random.Random(seed)
    kill_step = rng.randint(args.ckpt_every + 1, args.steps - args.ckpt_every - 1)
    rank = rng.randrange(args.world_size)
    job = control.submit(_spec(args))
    victim = control.wait_step(job.job_id, rank, kill_step, timeout=600)
    old_pids = {p["pid"] for p in control.progress(job.job_id).values()}
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    ckpt_dir = control.jobs_dir / job.job_id / "checkpoints"
    ckpt_at_kill = checkpoint.latest_good_step(ckpt_dir)
    print(f"  seed {seed}: killed rank {rank} (pid {victim['pid']}) at step "
          f"{victim['step']}; newest good checkpoint {ckpt_at_kill}", flush=True)

    def first_new_step():  # a step done by the new attempt's rank 0, not the old one
        p = control.progress(job.job_id).get(0)
        return p and p["pid"] not in old_pids and p.get("state") == "running" and \
            p["step"] > p["resumed_from"] and p
    resumed = control.wait("the first step after the restart", first_new_step,
                           timeout=300, poll_s=0.01)
    recovery_s = time.monotonic() - killed
    done = control.wait_state(job.job_id, c.JOB_STATE_COMPLETED, timeout=1800)
    weights = _weights(control, job.job_id, args.steps)
    weights_match = weights.keys() == clean_weights.keys() and all(
        torch.equal(weights[k], clean_weights[k]) for k in weights)
    losses = asyncio.run(_losses(settings.kafka_bootstrap, marks, job.job_id,
                                 args.world_size))
    curve = _curve(losses)
    missing = sorted(set(clean_curve) - set(curve))
    differing = sorted(k for k in clean_curve if k in curve and curve[k] != clean_curve[k])
    unequal_repeats = sorted(k for k, v in losses.items() if len(set(v)) > 1)
    result = {"seed": seed, "kill_step": victim["step"], "killed_rank": rank,
              "newest_checkpoint_at_kill": ckpt_at_kill,
              "resumed_from": resumed["resumed_from"],
              "kill_to_first_step_s": round(recovery_s, 2),
              "steps_lost": max(0, ckpt_at_kill - resumed["resumed_from"]),
              "weights_match": weights_match, "loss_curve_match": not missing and
              not differing and len(curve) == len(clean_curve),
              "steps_missing": len(missing), "steps_differing": len(differing),
              "steps_republished_unequal": len(unequal_repeats),
              "restarts": done.restarts}
    result["exact_match"] = result["weights_match"] and result["loss_curve_match"]
    print(f"  seed {seed}: recovered in {recovery_s:.2f} s, resumed from step "
          f"{result['resumed_from']}, {result['steps_lost']} steps lost; exact match "
          f"{result['exact_match']} (weights {weights_match}, loss curve "
          f"{result['loss_curve_match']}: {len(missing)} missing "
          f"{missing[:5]}, {len(differing)} differing {differing[:5]})", flush=True)
    return result


def run(args, settings: Settings) -> dict:
    from mlpe import stack
    from mlpe.control.local import LocalController
    from mlpe.v1 import control_pb2 as c

    if args.steps < 3 * args.ckpt_every:
        raise RuntimeError(f"--steps {args.steps} must be at least 3 x --ckpt-every "
                           f"({args.ckpt_every}) so the kill falls between checkpoints")
    if args.script is not None and not args.script.is_file():
        raise RuntimeError(f"--script {args.script}: no such file")
    if args.runs < 1:
        raise RuntimeError(f"--runs must be ≥ 1, got {args.runs}")
    first_seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    stack.up(settings, ("kafka", "redis"))
    roots = {"MLPE_CONTROL_SCRIPT_ROOTS": str(args.script.resolve().parent)} \
        if args.script else {}
    with tempfile.TemporaryDirectory(prefix="mlpe-bench-recovery-") as tmp:
        control = LocalController(settings.redis_url, settings.kafka_bootstrap, Path(tmp),
                                  slots=args.world_size, extra_env=roots)
        control.start()
        try:
            marks = asyncio.run(_end_offsets(settings.kafka_bootstrap))
            what = args.script or f"built-in {args.preset}"
            print(f"uninterrupted run of {what}: {args.steps} steps, {args.world_size} "
                  f"ranks, checkpoint every {args.ckpt_every}", flush=True)
            clean = control.submit(_spec(args))
            control.wait_state(clean.job_id, c.JOB_STATE_COMPLETED, timeout=1800)
            stalls = control.progress(clean.job_id)[0].get("stalls_ms", [])
            clean_weights = _weights(control, clean.job_id, args.steps)
            clean_curve = _curve(asyncio.run(_losses(settings.kafka_bootstrap, marks,
                                                     clean.job_id, args.world_size)))
            if len(clean_curve) != args.steps * args.world_size:
                raise RuntimeError(f"the uninterrupted run's loss curve has "
                                   f"{len(clean_curve)} of {args.steps * args.world_size} "
                                   "steps on Kafka")
            runs = [_killed_run(control, args, settings, first_seed + i, marks,
                                clean_weights, clean_curve) for i in range(args.runs)]
        finally:
            control.stop()
    recovery = [r["kill_to_first_step_s"] for r in runs]
    result = {
        "bench": "recovery", "entry": str(args.script) if args.script else "built-in",
        "runs": len(runs), "seeds": [r["seed"] for r in runs],
        "kill_to_first_step_s": round(statistics.median(recovery), 2),
        "kill_to_first_step_s_max": max(recovery),
        "steps_lost": max(r["steps_lost"] for r in runs),
        "exact_match": all(r["exact_match"] for r in runs),
        "weights_match": all(r["weights_match"] for r in runs),
        "loss_curve_match": all(r["loss_curve_match"] for r in runs),
        "ckpt_stall_ms": round(statistics.median(stalls), 2) if stalls else None,
        "ckpt_stall_ms_max": round(max(stalls), 2) if stalls else None,
        "checkpoints": len(stalls), "steps": args.steps, "world_size": args.world_size,
        "preset": None if args.script else args.preset, "per_run": runs}
    print(f"{len(runs)} killed run(s): kill → first new step p50 "
          f"{result['kill_to_first_step_s']} s, max {result['kill_to_first_step_s_max']} s; "
          f"steps lost {result['steps_lost']}; exact match in all: {result['exact_match']}; "
          f"checkpoint stall p50 {result['ckpt_stall_ms']} ms", file=sys.stderr)
    return result
