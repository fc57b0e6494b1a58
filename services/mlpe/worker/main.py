"""`mlpe worker`: one rank of the built-in model's training job — a script on mlpe.sdk,
started by `mlpe control` through its launcher (torchrun's environment plus MLPE_JOB_ID
and MLPE_JOB_DIR), or by hand under torchrun. The job folder holds the resolved spec
(`spec.json`), the checkpoints and the event spools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlpe.common import logs
from mlpe.common import settings as settings_module
from mlpe.common.settings import Settings

DESCRIPTION = __doc__.split("\n\n")[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", default=None,
                   help="job id (names its Redis keys and events; default $MLPE_JOB_ID)")
    p.add_argument("--job-dir", default=None, type=Path,
                   help="the job's folder: spec.json, checkpoints/, spool/ "
                   "(default $MLPE_JOB_DIR)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="one rank of a training job (started by mlpe control)",
                       description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    import dataclasses

    from mlpe.sdk import start
    from mlpe.worker.train import Trainer

    settings = dataclasses.replace(settings, job_id=args.job or settings.job_id,
                                   job_dir=args.job_dir or settings.job_dir)
    if settings.job_dir is None:
        print("mlpe worker: no job folder: pass --job-dir or set MLPE_JOB_DIR",
              file=sys.stderr)
        return 2
    spec_path = settings.job_dir / "spec.json"
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as err:
        print(f"mlpe worker: cannot read the job spec {spec_path}: {err}", file=sys.stderr)
        return 2
    run = start(device=spec["device"], settings=settings)
    log = logs.configure(f"worker-{run.rank}", settings.log_level, settings.log_format)
    trainer = Trainer(spec, run, settings.worker_fault)
    code = trainer.run_loop()
    log.info("worker done", job=run.job_id, rank=run.rank, step=trainer.step, exit_code=code)
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlpe.worker.main", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv), settings_module.load())


if __name__ == "__main__":
    sys.exit(main())
