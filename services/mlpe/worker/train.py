"""The training loop one rank runs (launched by torchrun from `mlpe control`).

Each step: rank 0 reads the job's control hash in Redis (pause, stop, checkpoint
requests) and every rank adds its own SIGTERM flag; one all-reduce (max) gives all ranks
the same decision. Data is addressed by position, gradients are averaged with one
all-reduce of a flat buffer in a fixed order, and the optimizer state round-trips
exactly, so on the CPU a run resumed from step k's checkpoint is bitwise the run that
never stopped.

Progress (step, time, pid, loss, …) goes to the job's ranks hash in Redis for the
controller's crash and hang watch; step and kernel events go to Kafka.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from contextlib import nullcontext
from pathlib import Path

import redis
import torch
import torch.distributed as dist

from mlpe.common.jobs import JobKeys, model_config
from mlpe.common.settings import Settings
from mlpe.kernels import dispatch, profile
from mlpe.kernels.adamw import FusedAdamW
from mlpe.v1 import training_pb2
from mlpe.worker import checkpoint
from mlpe.worker.data import SyntheticTokens, TokenFile
from mlpe.worker.model import GPT

log = logging.getLogger("mlpe.worker")
EXIT_PREEMPTED = 143  # after SIGTERM and an emergency checkpoint, as a signalled process


def lr_at(step: int, opt: dict, steps: int) -> float:
    """Linear warm-up to lr, then constant or cosine down to lr * min_lr_ratio."""
    lr, warmup = opt["lr"], opt["warmup_steps"]
    if warmup and step <= warmup:
        return lr * step / warmup
    if opt["schedule"] == "constant" or steps <= warmup:
        return lr
    progress = (step - warmup) / (steps - warmup)
    floor = lr * opt["min_lr_ratio"]
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for, but CUDA is not available here")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Fault:
    """MLPE_WORKER_FAULT=hang@STEP[:RANK] makes that rank stop making progress at STEP,
    once per job (a marker file remembers): how the hang watch is tested."""

    def __init__(self, spec: str, job_dir: Path, rank: int):
        self.step, self.marker = 0, job_dir / "fault-fired"
        if not spec:
            return
        kind, _, where = spec.partition("@")
        at, _, on_rank = where.partition(":")
        if kind != "hang" or not at.isdigit() or (on_rank and not on_rank.isdigit()):
            raise ValueError(f"MLPE_WORKER_FAULT={spec!r}: expected hang@STEP[:RANK]")
        if int(on_rank or 0) == rank:
            self.step = int(at)

    def maybe_hang(self, step: int) -> None:
        if self.step and step == self.step and not self.marker.exists():
            self.marker.touch()
            log.warning("fault injection: rank hangs at step %d", step)
            while True:
                time.sleep(3600)


class Trainer:
    def __init__(self, spec: dict, job_id: str, job_dir: Path, settings: Settings, launch,
                 publisher=None):
        self.spec, self.job_id, self.job_dir = spec, job_id, job_dir
        self.keys = JobKeys(settings.control_namespace)
        self.rank, self.world = launch.rank, launch.world_size
        if self.world != spec["world_size"]:
            raise RuntimeError(f"WORLD_SIZE={self.world} but the job asks for "
                               f"{spec['world_size']} ranks")
        self.device = pick_device(spec["device"], launch.local_rank)
        if self.device.type == "cpu":  # ranks share the cores; also fixes reduction order
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.publisher = publisher
        self.node = socket.gethostname()
        self.fault = Fault(settings.worker_fault, job_dir, self.rank)
        self.terminate = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

        cfg = model_config(spec)
        torch.manual_seed(spec["seed"])
        self.model = GPT(cfg).to(self.device)
        o = spec["optimizer"]
        self.optimizer = FusedAdamW(self.model.parameters(), lr=o["lr"],
                                    betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                                    weight_decay=o["weight_decay"])
        d = spec["data"]
        self.data = (SyntheticTokens(cfg.vocab, cfg.seq_len, d["seed"]) if d["kind"] ==
                     "synthetic" else TokenFile(d["path"], cfg.vocab, cfg.seq_len, d["seed"],
                                                d["dtype"]))
        self.accum = spec["global_batch"] // (spec["micro_batch"] * self.world)
        self.tokens_per_step = self.accum * spec["micro_batch"] * cfg.seq_len
        self.saver = (checkpoint.AsyncCheckpointer(job_dir / "checkpoints",
                                                   spec["checkpoint"]["keep"])
                      if self.rank == 0 else None)
        self.step = self.resumed_from = 0
        # With the pid, names this process for a kill that must not hit a recycled pid.
        self.start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        self.checkpoint_seq = 0
        self.last_checkpoint_time = time.monotonic()
        self.stalls_ms: list[float] = []
        if spec["kernel_report_steps"]:
            profile.enable()

    def _on_sigterm(self, signum, frame) -> None:
        self.terminate = True

    # -- state ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": torch.get_rng_state(), "step": self.step}

    def resume(self) -> int:
        loaded = checkpoint.load_latest(self.job_dir / "checkpoints")
        if loaded is None:
            return 0
        step, state = loaded
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = step
        log.info("rank %d resumed from the checkpoint of step %d", self.rank, step)
        return step

    def save(self) -> None:
        if self.saver is not None:
            stall = self.saver.save(self.step, self.state())
            self.stalls_ms.append(stall)
            self.last_checkpoint_time = time.monotonic()

    # -- control ----------------------------------------------------------------------
    def decide(self) -> tuple[bool, bool, bool, bool]:
        """(pause, stop, checkpoint now, terminate), the same on every rank."""
        flags = torch.zeros(4, dtype=torch.int64)
        if self.rank == 0:
            raw = self.redis.hgetall(self.keys.control(self.job_id))
            seq = int(raw.get(b"checkpoint", 0))
            flags[0] = int(raw.get(b"pause", 0))
            flags[1] = int(raw.get(b"stop", 0))
            flags[2] = seq
        flags[3] = int(self.terminate)
        if self.world > 1:
            flags = flags.to(self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.cpu()
        pause, stop, seq, terminate = (int(v) for v in flags)
        wanted = seq > self.checkpoint_seq
        self.checkpoint_seq = max(self.checkpoint_seq, seq)
        return bool(pause), bool(stop), wanted, bool(terminate)

    def publish_progress(self, **progress) -> None:
        progress.update(step=self.step, time_ns=time.time_ns(), pid=os.getpid(),
                        start_ticks=self.start_ticks,
                        checkpoint_step=self.saver.last_written if self.saver else 0,
                        resumed_from=self.resumed_from)
        self.redis.hset(self.keys.ranks(self.job_id), str(self.rank), json.dumps(progress))

    # -- one step ---------------------------------------------------------------------
    def train_step(self) -> dict:
        spec, step = self.spec, self.step + 1
        t0 = time.perf_counter()
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if spec["precision"] == "bf16" else nullcontext())
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            index = ((step - 1) * self.world + self.rank) * self.accum + micro
            x, y = (t.to(self.device) for t in self.data.batch(index, spec["micro_batch"]))
            with autocast:
                loss = self.model(x, y) / self.accum
            loss.backward()
            loss_sum += loss.detach().float()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        clip = spec["optimizer"]["grad_clip"]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        lr = lr_at(step, spec["optimizer"], spec["steps"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss_sum)  # synchronises: the step is done
        self.step = step
        seconds = time.perf_counter() - t0
        return {"loss": loss_value, "grad_norm": float(grad_norm), "lr": lr,
                "step_time_s": seconds, "tokens_per_s": self.tokens_per_step / seconds}

    def publish(self, result: dict) -> None:
        if self.publisher is None:
            return
        cuda = self.device.type == "cuda"
        self.publisher.step(training_pb2.TrainStep(
            job_id=self.job_id, rank=self.rank, world_size=self.world, step=self.step,
            time_ns=time.time_ns(), loss=result["loss"], tokens_per_s=result["tokens_per_s"],
            step_time_s=result["step_time_s"],
            mem_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else 0,
            mem_reserved_bytes=torch.cuda.memory_reserved() if cuda else 0,
            grad_norm=result["grad_norm"], learning_rate=result["lr"], node_id=self.node,
            gpu_index=self.device.index if cuda else -1, micro_batches=self.accum))
        every = self.spec["kernel_report_steps"]
        if every and self.step % every == 0:
            self.publisher.kernels(kernel_summary(self.job_id, self.rank,
                                                  self.step - every + 1, self.step,
                                                  self.device))

    def publish_halt(self, reason: str) -> None:
        """Tell the stream this rank stops stepping on purpose: its silence is no stall."""
        if self.publisher is not None:
            self.publisher.step(training_pb2.TrainStep(
                job_id=self.job_id, rank=self.rank, world_size=self.world, step=self.step,
                time_ns=time.time_ns(), node_id=self.node, halt=reason,
                gpu_index=self.device.index if self.device.type == "cuda" else -1))

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> int:
        self.resumed_from = self.resume()
        policy = self.spec["checkpoint"]
        self.publish_progress(state="starting")
        paused = False
        while self.step < self.spec["steps"]:
            pause, stop, wanted, terminate = self.decide()
            if terminate:  # preemption: keep everything done so far, then go
                self.save()
                self._finish("preempted")
                return EXIT_PREEMPTED
            if stop:
                self._finish("stopped")
                return 0
            if wanted:
                self.save()
            if pause:
                if not paused:
                    self.publish_halt("paused")
                paused = True
                self.publish_progress(state="paused")
                time.sleep(0.2)
                continue
            paused = False
            self.fault.maybe_hang(self.step + 1)
            result = self.train_step()
            self.publish(result)
            due = (policy["every_steps"] and self.step % policy["every_steps"] == 0) or (
                policy["every_seconds"] and
                time.monotonic() - self.last_checkpoint_time >= policy["every_seconds"])
            if due or self.step == self.spec["steps"]:
                self.save()
            self.publish_progress(state="running", loss=result["loss"],
                        tokens_per_s=result["tokens_per_s"] * self.world,
                        ckpt_stall_ms=self.stalls_ms[-1] if self.stalls_ms else 0.0)
        self._finish("completed")
        return 0

    def _finish(self, state: str) -> None:
        if self.saver is not None:
            self.saver.wait()
        self.publish_progress(state=state, stalls_ms=self.stalls_ms)
        if self.publisher is not None:
            self.publish_halt(state)
            self.publisher.close()
        if self.world > 1:
            dist.destroy_process_group()


def kernel_summary(job_id: str, rank: int, first: int, last: int, device: torch.device):
    backend = "triton" if dispatch.use_triton(torch.empty(0, device=device)) else "reference"
    summary = training_pb2.KernelSummary(job_id=job_id, rank=rank, first_step=first,
                                         last_step=last, time_ns=time.time_ns(),
                                         backend=backend)
    for name, t in profile.report().items():
        op, _, direction = name.rpartition(".")
        summary.kernels.add(op=op, direction=direction, calls=t["calls"],
                            total_ms=t["total_ms"], p50_ms=t["p50_ms"], p99_ms=t["p99_ms"],
                            max_ms=t["max_ms"])
    return summary
