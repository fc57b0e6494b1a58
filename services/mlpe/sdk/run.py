"""One rank of a training run, as the script sees it: `start()` returns a `Run`.

Under `mlpe control` (the launcher sets MLPE_JOB_ID and MLPE_JOB_DIR) a Run reads the
job's control hash in Redis (pause, stop, checkpoint now), writes the progress the
controller's crash and hang watch reads, and sends TrainStep and KernelSummary events
to Kafka through the agent's shipper (spooled to disk while Kafka is away). Under plain
torchrun or python it does the same minus Redis and Kafka: checkpoints, resume and
SIGTERM handling work alike.

Every decision is taken by rank 0 and shared with one all-reduce (max) on a gloo group
of the SDK's own, so all ranks act on the same step whatever backend training uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mlpe.common.jobs import JobKeys
from mlpe.common.settings import Settings
from mlpe.common.settings import load as load_settings
from mlpe.sdk import checkpoint

log = logging.getLogger("mlpe.sdk")
EXIT_PREEMPTED = 143  # after SIGTERM and an emergency checkpoint, as a signalled process
PAUSE_POLL_S = 0.2


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the loop should do before its next step (the same on every rank)."""
    pause: bool = False       # paused by the controller: skip stepping (poll again)
    stop: bool = False        # cancelled: finish now
    checkpoint: bool = False  # save now: asked for, or due by the checkpoint policy
    preempt: bool = False     # SIGTERM: save and finish (exit code 143)


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for, but CUDA is not available here")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if choice not in ("auto", "cpu"):
        raise ValueError(f"device: 'auto', 'cpu' or 'cuda', got {choice!r}")
    return torch.device("cpu")


def _start_ticks() -> int:
    """With the pid, names this process for a kill that must not hit a recycled pid."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])


def _is_sharded(state: dict) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for v in state.values()
               if isinstance(v, torch.nn.Module) for p in v.parameters())


def _plain(state: dict) -> dict:
    """Modules and optimizers as their state_dict()s (replicated state, one file)."""
    return {k: v.state_dict() if isinstance(v, torch.nn.Module | torch.optim.Optimizer)
            else v for k, v in state.items()}


def _the_model(state: dict) -> torch.nn.Module:
    models = [v for v in state.values() if isinstance(v, torch.nn.Module)]
    if len(models) != 1:
        raise ValueError("sharded state: an optimizer needs exactly one model beside it in "
                         f"the state dict, found {len(models)}")
    return models[0]


def _dcp_state(state: dict) -> dict:
    """Modules and optimizers as DCP state dicts (fully qualified names, DTensor shards),
    which DCP can reshard on load."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    out = {}
    for key, value in state.items():
        if isinstance(value, torch.nn.Module):
            out[key] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            out[key] = get_optimizer_state_dict(_the_model(state), value)
        else:
            out[key] = value
    return out


class Run:
    """Made by `start()`; see the module docstring and the README's SDK section."""

    def __init__(self, *, device: str | None = None, checkpoint_dir: str | Path | None = None,
                 every_steps: int = 0, every_seconds: float = 0.0, keep: int = 3,
                 settings: Settings | None = None):
        env = os.environ  # torchrun's variables (not mlpe's settings)
        self.rank, self.world_size = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        self.local_rank = int(env.get("LOCAL_RANK", 0))
        self.local_world_size = int(env.get("LOCAL_WORLD_SIZE", self.world_size))
        self.settings = settings or load_settings()
        self.managed = self.settings.job_dir is not None and bool(self.settings.job_id)
        self.job_id = self.settings.job_id or "local"
        self.job_dir = self.settings.job_dir
        self.spec = self._read_spec()
        self.device = pick_device(device or self.spec.get("device", "auto"), self.local_rank)
        if self.device.type == "cpu" and self.local_world_size > 1:
            # ranks share the cores; a fixed thread count also fixes the reduction order
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.local_world_size))
        self.owns_process_group = False
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_process_group = True
        self.group = dist.new_group(backend="gloo") if self.world_size > 1 else None
        # DCP's background writer runs collectives on a thread of its own: on the decision
        # group above they interleaved with poll()'s all-reduce and the job hung in its
        # first sharded save. So sharded checkpoints get a gloo group of their own.
        self.checkpoint_group = dist.new_group(backend="gloo") if self.world_size > 1 \
            else None

        policy = self.spec.get("checkpoint", {})
        self.every_steps = policy.get("every_steps") or every_steps
        self.every_seconds = policy.get("every_seconds") or every_seconds
        self.keep = policy.get("keep") or keep
        self.checkpoint_dir = (self.job_dir / "checkpoints" if self.managed else
                               Path(checkpoint_dir or "checkpoints"))
        self.savers: dict[str, object] = {}  # "torch" / "dcp" -> its async checkpointer
        self.step = self.resumed_from = self.saved_step = 0
        self.last_save_time = self.last_report_time = time.monotonic()
        self.stalls_ms: list[float] = []
        self.checkpoint_seq = 0
        self.paused = self.stopped = self.terminate = self.finished = False
        self.pause_put_off = False  # the pause came with a checkpoint to save first
        self.kernel_report_steps = self.spec.get("kernel_report_steps", 0)
        self.node = socket.gethostname()
        self.pid, self.start_ticks = os.getpid(), _start_ticks()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.redis = self.publisher = None
        self.keys = JobKeys(self.settings.control_namespace)
        if self.managed:
            import redis

            from mlpe.sdk.publish import Publisher

            self.redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5)
            self.publisher = Publisher(self.settings.kafka_bootstrap,
                                       self.job_dir / "spool" / f"rank-{self.rank}")
        if self.kernel_report_steps:
            from mlpe.kernels import profile

            profile.enable()
        self._progress(state="launching")  # "starting" once load() knows the step

    def _read_spec(self) -> dict:
        if not self.managed:
            return {}
        path = self.job_dir / "spec.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RuntimeError(f"cannot read the job spec {path}: {err}") from None

    def _on_sigterm(self, signum, frame) -> None:
        self.terminate = True

    # -- the controller's side ------------------------------------------------------------
    def _progress(self, **fields) -> None:
        if self.redis is None:
            return
        saver = self.savers.get("dcp") or self.savers.get("torch")
        fields.update(step=self.step, time_ns=time.time_ns(), pid=self.pid,
                      start_ticks=self.start_ticks, resumed_from=self.resumed_from,
                      checkpoint_step=saver.last_written if saver and self.rank == 0 else 0)
        try:
            self.redis.hset(self.keys.ranks(self.job_id), str(self.rank), json.dumps(fields))
        except Exception as err:  # noqa: BLE001 - a Redis blip must not end training
            log.warning("progress not written to Redis: %s", err)

    def _control(self) -> tuple[int, int, int]:
        if self.redis is None:
            return 0, 0, 0
        try:
            raw = self.redis.hgetall(self.keys.control(self.job_id))
        except Exception as err:  # noqa: BLE001 - keep the last decision; try next step
            log.warning("control hash not read from Redis: %s", err)
            return int(self.paused), 0, self.checkpoint_seq
        return (int(raw.get(b"pause", 0)), int(raw.get(b"stop", 0)),
                int(raw.get(b"checkpoint", 0)))

    def poll(self) -> Decision:
        """The controller's and the signal handler's decisions, the same on every rank;
        call it once before each step. While paused it waits a little before returning,
        so `if d.pause: continue` does not spin."""
        flags = torch.zeros(5, dtype=torch.int64)
        if self.rank == 0:
            flags[0], flags[1], flags[2] = self._control()
            flags[4] = int(self._due())
        flags[3] = int(self.terminate)
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        pause, stop, seq, preempt, due = (int(v) for v in flags)
        wanted = seq > self.checkpoint_seq
        self.checkpoint_seq = max(self.checkpoint_seq, seq)
        self.stopped |= bool(stop)
        self.terminate |= bool(preempt)
        if pause and not (stop or preempt):
            # paused = quiescent: no checkpoint lands while paused. A decision that asks
            # for one (due, or requested) is the caller's cue to save now, so "paused" is
            # said at the next poll, once that save is written (at the next poll even if
            # the caller did not save: a pause is never put off for longer).
            if (wanted or due) and not self.pause_put_off:
                self.pause_put_off = True
            else:
                self.pause_put_off = False
                for saver in self.savers.values():
                    saver.wait()
                if not self.paused:
                    self._halt("paused")
                self.paused = True
                self._progress(state="paused")  # also says when a requested one is done
                time.sleep(PAUSE_POLL_S)
        elif self.paused:
            self.paused = False
            self.last_report_time = time.monotonic()  # a pause is not step time
        return Decision(bool(pause), bool(stop), wanted or bool(due), bool(preempt))

    def _due(self) -> bool:
        if self.step <= self.saved_step:
            return False
        return bool(self.every_steps and self.step % self.every_steps == 0) or bool(
            self.every_seconds and time.monotonic() - self.last_save_time >= self.every_seconds)

    # -- telemetry ------------------------------------------------------------------------
    def report(self, step: int, loss: float | None = None, tokens: int = 0,
               step_time_s: float | None = None, **metrics: float) -> None:
        """Step `step` is done: `loss`, the `tokens` this rank processed in it, and any
        other metrics (grad_norm, lr and micro_batches land in TrainStep's own fields).
        Without `step_time_s`, the time since the previous report is the step's."""
        now = time.monotonic()
        seconds = step_time_s if step_time_s is not None else now - self.last_report_time
        self.last_report_time, self.step = now, step
        loss = float("nan") if loss is None else float(loss)
        tokens_per_s = tokens / seconds if tokens and seconds > 0 else 0.0
        self._progress(state="running", loss=loss, tokens_per_s=tokens_per_s * self.world_size,
                       ckpt_stall_ms=self.stalls_ms[-1] if self.stalls_ms else 0.0)
        if self.publisher is None:
            return
        from mlpe.v1 import training_pb2

        cuda = self.device.type == "cuda"
        grad_norm = float(metrics.pop("grad_norm", 0.0))
        lr = float(metrics.pop("lr", metrics.pop("learning_rate", 0.0)))
        micro = int(metrics.pop("micro_batches", 0))
        self.publisher.step(training_pb2.TrainStep(
            job_id=self.job_id, rank=self.rank, world_size=self.world_size, step=step,
            time_ns=time.time_ns(), loss=loss, tokens_per_s=tokens_per_s,
            step_time_s=seconds,
            mem_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else 0,
            mem_reserved_bytes=torch.cuda.memory_reserved() if cuda else 0,
            grad_norm=grad_norm, learning_rate=lr, node_id=self.node,
            gpu_index=self.device.index if cuda else -1, micro_batches=micro,
            metrics={k: float(v) for k, v in metrics.items()}))
        every = self.kernel_report_steps
        if every and step % every == 0:
            summary = kernel_summary(self.job_id, self.rank, step - every + 1, step,
                                     self.device)
            if summary.kernels:
                self.publisher.kernels(summary)

    def _halt(self, reason: str) -> None:
        """Tell the stream this rank stops stepping on purpose: its silence is no stall."""
        if self.publisher is not None:
            from mlpe.v1 import training_pb2

            self.publisher.step(training_pb2.TrainStep(
                job_id=self.job_id, rank=self.rank, world_size=self.world_size,
                step=self.step, time_ns=time.time_ns(), node_id=self.node, halt=reason,
                gpu_index=self.device.index if self.device.type == "cuda" else -1))

    # -- checkpoints ----------------------------------------------------------------------
    def _saver(self, fmt: str):
        if fmt not in self.savers:
            self.savers[fmt] = (
                checkpoint.ShardedCheckpointer(self.checkpoint_dir, self.keep, self.rank,
                                               self.checkpoint_group) if fmt == "dcp" else
                checkpoint.AsyncCheckpointer(self.checkpoint_dir, self.keep))
        return self.savers[fmt]

    def save(self, step: int, state: dict, sharded: bool | None = None) -> float:
        """Checkpoint `state` (modules, optimizers, tensors, plain values) as step `step`,
        in the background; returns how long training stalled, in ms. Sharded state
        (DTensor parameters, e.g. FSDP2) goes through torch.distributed.checkpoint, every
        rank writing its shards; replicated state is written by rank 0 alone. Call it on
        every rank."""
        sharded = _is_sharded(state) if sharded is None else sharded
        if sharded and self.checkpoint_group is None and dist.is_initialized():
            self.checkpoint_group = dist.new_group(backend="gloo")
        stall = 0.0
        if sharded:
            stall = self._saver("dcp").save(step, _dcp_state(state))
        elif self.rank == 0:
            stall = self._saver("torch").save(step, _plain(state))
        self.stalls_ms.append(stall)
        self.saved_step, self.last_save_time = step, time.monotonic()
        return stall

    def load(self, state: dict) -> int:
        """Fill `state` from the newest good checkpoint (modules and optimizers in place,
        other entries replaced) and return its step; 0 when there is none. A checkpoint
        whose files do not match its manifest is skipped for the previous one. Sharded
        checkpoints load into any world size DCP can reshard to."""
        found = None
        if self.rank == 0:
            got = checkpoint.newest_good(self.checkpoint_dir)
            found = got and [got[0], str(got[1]), got[2].get("format", "torch")]
        if self.group is not None:
            box = [found]
            dist.broadcast_object_list(box, src=0, group=self.group)
            found = box[0]
        if not found:
            return 0
        step, path, fmt = found
        if fmt == "dcp":
            self._load_dcp(state, Path(path))
        else:
            payload = torch.load(Path(path) / checkpoint.STATE, map_location="cpu",
                                 weights_only=False)
            for key, target in state.items():
                if key not in payload:
                    raise KeyError(f"the checkpoint of step {step} has no {key!r} (it has "
                                   f"{', '.join(map(repr, payload))})")
                if isinstance(target, torch.nn.Module | torch.optim.Optimizer):
                    target.load_state_dict(payload[key])
                else:
                    state[key] = payload[key]
        self.step = self.resumed_from = self.saved_step = step
        self.last_report_time = time.monotonic()
        if self.publisher is not None:  # events of steps up to here are not sent again
            again = self.publisher.republish(step)
            if again:
                log.info("rank %d: %d event(s) the previous process may have lost sent "
                         "again", self.rank, again)
        log.info("rank %d resumed from the checkpoint of step %d (%s)", self.rank, step, fmt)
        self._progress(state="starting")
        return step

    def _load_dcp(self, state: dict, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        loaded = _dcp_state(state)
        if self.checkpoint_group is None and dist.is_initialized():
            self.checkpoint_group = dist.new_group(backend="gloo")
        dcp.load(loaded, checkpoint_id=str(path), process_group=self.checkpoint_group)
        for key, target in state.items():
            if isinstance(target, torch.nn.Module):
                set_model_state_dict(target, loaded[key])
            elif isinstance(target, torch.optim.Optimizer):
                set_optimizer_state_dict(_the_model(state), target, loaded[key])
            else:
                state[key] = loaded[key]

    # -- the end --------------------------------------------------------------------------
    def finish(self, status: str | None = None) -> int:
        """Wait for checkpoints in flight, say how the run ended, flush the events; returns
        the exit code to end with (143 after SIGTERM, else 0)."""
        if self.finished:
            return EXIT_PREEMPTED if self.terminate else 0
        self.finished = True
        status = status or ("preempted" if self.terminate else
                            "stopped" if self.stopped else "completed")
        for saver in self.savers.values():
            saver.wait()
        self._progress(state=status, stalls_ms=self.stalls_ms)
        if self.publisher is not None:
            self._halt(status)
            self.publisher.close()
        if self.owns_process_group:
            dist.destroy_process_group()
        return EXIT_PREEMPTED if status == "preempted" else 0

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.finish()
        elif self.publisher is not None:  # keep what was reported; the crash says the rest
            self.publisher.close()


def start(**options) -> Run:
    """The current rank's Run (call once per process, on every rank, after or instead of
    init_process_group). Options: device ("auto", "cpu", "cuda"), checkpoint_dir (when
    not under mlpe control; default ./checkpoints), every_steps / every_seconds (the
    checkpoint policy when the job spec sets none), keep (checkpoints kept, 3)."""
    return Run(**options)


def kernel_summary(job_id: str, rank: int, first: int, last: int, device: torch.device):
    """mlpe.kernels' op timings since the last summary, as a KernelSummary event."""
    from mlpe.kernels import dispatch, profile
    from mlpe.v1 import training_pb2

    backend = "triton" if dispatch.use_triton(torch.empty(0, device=device)) else "reference"
    summary = training_pb2.KernelSummary(job_id=job_id, rank=rank, first_step=first,
                                         last_step=last, time_ns=time.time_ns(),
                                         backend=backend)
    for name, t in profile.report().items():
        op, _, direction = name.rpartition(".")
        summary.kernels.add(op=op, direction=direction, calls=t["calls"],
                            total_ms=t["total_ms"], p50_ms=t["p50_ms"], p99_ms=t["p99_ms"],
                            max_ms=t["max_ms"], bytes_moved=t.get("bytes_per_call", 0.0))
    return summary
