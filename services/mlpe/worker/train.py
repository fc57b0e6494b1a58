"""The built-in model's training loop: a script on mlpe.sdk like any user's.

The SDK's `Run` gives each step the controller's decisions (pause, stop, checkpoint,
SIGTERM), writes the progress the crash and hang watch reads, publishes step and kernel
events, and saves and loads the checksummed checkpoints. The model is the built-in GPT
or a Hugging Face causal LM (hf_model.py). Data is addressed by position; gradients are
averaged with one all-reduce of a flat buffer in a fixed order (ddp) or reduce-scattered
by FSDP2 (fsdp: parameters, gradients and optimizer state sharded, saved through the
SDK's sharded DCP path); the optimizer state and RNG round-trip exactly, so on the CPU a
run resumed from step k's checkpoint is bitwise the run that never stopped.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from mlpe.common.jobs import model_config
from mlpe.kernels.adamw import FusedAdamW
from mlpe.sdk import EXIT_PREEMPTED, Run
from mlpe.worker.data import SyntheticTokens, TokenFile
from mlpe.worker.model import GPT

log = logging.getLogger("mlpe.worker")


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


def shard(model: torch.nn.Module, parallelism: dict, precision: str) -> None:
    """FSDP2 over all ranks (the default process group: NCCL on GPUs, gloo on the CPU):
    each transformer block its own unit (gathered just before it runs), then the root
    (embedding, final norm, head). bf16 keeps fp32 master weights, gathers bf16 and
    reduces gradients in fp32; CPU offload keeps parameters, gradients and optimizer
    state on the host between uses."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # one rank: FSDP2 still wants a process group
        device = next(model.parameters()).device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    options = {"reshard_after_forward": parallelism["reshard_after_forward"]}
    if precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=torch.float32)
    if parallelism["cpu_offload"]:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in model.blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)


class Trainer:
    def __init__(self, spec: dict, run: Run, fault_spec: str = ""):
        self.spec, self.run = spec, run
        self.rank, self.world, self.device = run.rank, run.world_size, run.device
        if self.world != spec["world_size"]:
            raise RuntimeError(f"WORLD_SIZE={self.world} but the job asks for "
                               f"{spec['world_size']} ranks")
        self.fault = Fault(fault_spec, run.job_dir or Path("."), self.rank)
        cfg = model_config(spec)
        torch.manual_seed(spec["seed"])
        if spec.get("hf"):
            from mlpe.worker.hf_model import HFCausalLM

            self.model = HFCausalLM(spec["hf"]).to(self.device)
            vocab = self.model.vocab
        else:
            self.model, vocab = GPT(cfg).to(self.device), cfg.vocab
        self.parallelism = spec.get("parallelism") or {"kind": "ddp"}
        self.sharded = self.parallelism["kind"] == "fsdp"
        if self.sharded:
            shard(self.model, self.parallelism, spec["precision"])
        o = spec["optimizer"]
        self.optimizer = FusedAdamW(self.model.parameters(), lr=o["lr"],
                                    betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                                    weight_decay=o["weight_decay"])
        d = spec["data"]
        self.data = (SyntheticTokens(vocab, cfg.seq_len, d["seed"]) if d["kind"] ==
                     "synthetic" else TokenFile(d["path"], vocab, cfg.seq_len, d["seed"],
                                                d["dtype"]))
        self.accum = spec["global_batch"] // (spec["micro_batch"] * self.world)
        self.tokens_per_step = self.accum * spec["micro_batch"] * cfg.seq_len
        self.step = 0

    def state(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer,
                "rng": torch.get_rng_state(), "step": self.step}

    def resume(self) -> int:
        state = self.state()
        step = self.run.load(state)
        if step:
            torch.set_rng_state(state["rng"])
        self.step = step
        return step

    def save(self) -> None:
        self.run.save(self.step, self.state())

    # -- one step ---------------------------------------------------------------------
    def train_step(self) -> dict:
        spec, step = self.spec, self.step + 1
        t0 = time.perf_counter()
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)  # FSDP2: its own policy
                    if spec["precision"] == "bf16" and not self.sharded else nullcontext())
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            index = ((step - 1) * self.world + self.rank) * self.accum + micro
            x, y = (t.to(self.device) for t in self.data.batch(index, spec["micro_batch"]))
            with autocast:
                loss = self.model(x, y) / self.accum
            loss.backward()
            loss_sum += loss.detach().float()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.world > 1 and not self.sharded:  # FSDP2 reduce-scattered in backward
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
        return {"loss": loss_value, "grad_norm": float(grad_norm), "lr": lr,
                "step_time_s": time.perf_counter() - t0}

    # -- the loop ---------------------------------------------------------------------
    def run_loop(self) -> int:
        self.resume()
        while self.step < self.spec["steps"]:
            decision = self.run.poll()
            if decision.checkpoint or decision.preempt:
                self.save()  # preemption: keep everything done so far, then go
            if decision.preempt:
                return self.run.finish("preempted") or EXIT_PREEMPTED
            if decision.stop:
                return self.run.finish("stopped")
            if decision.pause:
                continue
            self.fault.maybe_hang(self.step + 1)
            result = self.train_step()
            self.run.report(self.step, loss=result["loss"], tokens=self.tokens_per_step,
                            step_time_s=result["step_time_s"], grad_norm=result["grad_norm"],
                            lr=result["lr"], micro_batches=self.accum)
        self.save()
        return self.run.finish("completed")
