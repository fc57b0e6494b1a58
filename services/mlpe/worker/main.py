"""`mlpe worker`: one rank of a training job (normally started by `mlpe control` through
torchrun, which sets RANK, WORLD_SIZE and the rendezvous). The job folder holds the
resolved spec (`spec.json`), the checkpoints and the event spools."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from mlpe.common import logs
from mlpe.common import settings as settings_module
from mlpe.common.settings import Settings

DESCRIPTION = __doc__.split("\n\n")[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="job id (names its Redis keys and events)")
    p.add_argument("--job-dir", required=True, type=Path,
                   help="the job's folder: spec.json, checkpoints/, spool/")
    p.add_argument("--no-kafka", action="store_true",
                   help="do not publish step and kernel events (tests, offline runs)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="one rank of a training job (started by mlpe control)",
                       description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this rank sits, as torchrun's launch environment says (1 rank without it):
    the one place the worker reads the environment itself, since torchrun, not mlpe's
    Settings, owns these variables."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    under_torchrun: bool = False

    @classmethod
    def from_environment(cls) -> Launch:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                   int(env.get("LOCAL_RANK", 0)), "TORCHELASTIC_RUN_ID" in env)


def die_with_parent() -> None:
    """SIGKILL this rank when its parent (torchrun's agent) dies: torchrun starts each
    rank in a session of its own, so a killed launcher would otherwise leave it training."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent was already gone before prctl
        os._exit(1)


def run(args, settings: Settings) -> int:
    from mlpe.worker.publish import Publisher
    from mlpe.worker.train import Trainer

    launch = Launch.from_environment()
    if launch.under_torchrun:
        die_with_parent()
    rank = launch.rank
    log = logs.configure(f"worker-{rank}", settings.log_level, settings.log_format)
    spec_path = args.job_dir / "spec.json"
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as err:
        log.error("cannot read the job spec", path=str(spec_path), error=str(err))
        return 2
    publisher = (None if args.no_kafka else
                 Publisher(settings.kafka_bootstrap, args.job_dir / "spool" / f"rank-{rank}"))
    trainer = Trainer(spec, args.job, args.job_dir, settings, launch, publisher)
    code = trainer.run()
    log.info("worker done", job=args.job, rank=rank, step=trainer.step, exit_code=code)
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlpe.worker.main", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv), settings_module.load())


if __name__ == "__main__":
    sys.exit(main())
