"""`mlpe jobs …`: the training-control client (submit, list, status, pause, resume,
cancel, checkpoint, events), with live progress."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path

from mlpe.common.settings import Settings
from mlpe.common.tokens import control_token

ACTIONS = ("submit", "list", "status", "pause", "resume", "cancel", "checkpoint", "events")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="submit and manage training jobs (talks to mlpe control)",
                       description="Talks to mlpe control at $MLPE_CONTROL_ADDRESS "
                       "(127.0.0.1:50052). State-changing actions send the bearer token "
                       "from $MLPE_CONTROL_TOKEN or the local secrets folder; TLS when "
                       "$MLPE_CONTROL_TLS_CA names the CA certificate.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser("submit", help="submit a job (flags, or --spec FILE as JSON)")
    s.add_argument("--spec", type=Path, help="a JobSpec as JSON (flags below override it)")
    s.add_argument("--name", help="job name")
    s.add_argument("--script", type=Path,
                   help="run your own training script (on mlpe.sdk) instead of the built-in "
                   "model; its arguments go after --")
    s.add_argument("--module", help="or a module (python -m MODULE), found from --workdir")
    s.add_argument("--workdir", type=Path,
                   help="the script's working directory (default: the script's folder)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the script (repeatable)")
    s.add_argument("script_args", nargs="*", metavar="-- ARGS",
                   help="the script's own arguments, after --")
    s.add_argument("--preset", help="model preset: tiny, small, gpt-30m, gpt-125m")
    for flag in ("layers", "hidden", "heads", "kv-heads", "vocab", "seq-len"):
        s.add_argument(f"--{flag}", type=int, help=f"model {flag} (overrides the preset)")
    s.add_argument("--hf-config", metavar="JSON|FILE",
                   help="train a Hugging Face causal LM from this config (inline JSON with "
                   "model_type, or a local config.json), randomly initialised")
    s.add_argument("--hf-pretrained", type=Path, metavar="DIR",
                   help="or from a local folder written by save_pretrained")
    s.add_argument("--no-mlpe-kernels", action="store_true",
                   help="leave the Hugging Face model unpatched (default: mlpe.kernels.hf)")
    s.add_argument("--parallelism", choices=("ddp", "fsdp"),
                   help="ddp (replicated, default) or fsdp (FSDP2: sharded parameters, "
                   "gradients and optimizer state)")
    s.add_argument("--no-reshard-after-forward", action="store_true",
                   help="fsdp: keep gathered weights from forward to backward (faster, "
                   "more memory)")
    s.add_argument("--cpu-offload", action="store_true",
                   help="fsdp: parameters, gradients and optimizer state on the CPU")
    s.add_argument("--data", metavar="FILE", help="token file (uint16); default synthetic")
    s.add_argument("--steps", type=int, help="optimizer steps")
    s.add_argument("--global-batch", type=int, help="sequences per step, all ranks")
    s.add_argument("--micro-batch", type=int, help="sequences per forward on one rank")
    s.add_argument("--world-size", type=int, help="ranks (processes)")
    s.add_argument("--precision", choices=("fp32", "bf16"))
    s.add_argument("--recompute", choices=("none", "full"))
    s.add_argument("--device", choices=("auto", "cpu", "cuda"))
    s.add_argument("--lr", type=float, help="peak learning rate (3e-4)")
    s.add_argument("--warmup-steps", type=int)
    s.add_argument("--schedule", choices=("cosine", "constant"))
    s.add_argument("--ckpt-every", type=int, help="checkpoint every N steps")
    s.add_argument("--ckpt-seconds", type=float, help="checkpoint every S seconds")
    s.add_argument("--keep", type=int, help="checkpoints kept (3)")
    s.add_argument("--priority", type=int, help="higher runs first")
    s.add_argument("--max-restarts", type=int, help="automatic restarts (0)")
    s.add_argument("--hang-timeout", type=float, help="seconds without a step = hung (120)")
    s.add_argument("--seed", type=int)
    s.add_argument("--kernel-report-steps", type=int, help="kernel timings every N steps")
    s.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label for the job, e.g. team=vision (repeatable): label budgets "
                   "($MLPE_BUDGETS) add up the cost of every job with theirs")
    s.add_argument("--budget", type=float, metavar="AMOUNT",
                   help="what the job may cost, in the price table's currency: alerts at 80 "
                   "%% and 100 %%, and at 100 %% --budget-policy")
    s.add_argument("--budget-policy", choices=("pause", "stop", "warn"),
                   help="at 100 %% of the budget: pause (checkpoint, then pause; default), "
                   "stop (cancel) or warn (alert only)")
    s.add_argument("--follow", action="store_true", help="then show live progress")
    lst = actions.add_parser("list", help="jobs, newest first")
    lst.add_argument("--state", action="append", default=[],
                     choices=("queued", "running", "paused", "completed", "failed",
                              "cancelled"), help="only these states (repeatable)")
    lst.add_argument("--limit", type=int, default=100)
    for name, text in (("status", "one job"), ("pause", "pause a running job"),
                       ("resume", "resume a paused job"), ("cancel", "cancel a job"),
                       ("checkpoint", "checkpoint a running job now"),
                       ("events", "a job's events, then live until it ends")):
        a = actions.add_parser(name, help=text)
        a.add_argument("job_id")
    for a in actions.choices.values():
        a.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def build_spec(args):
    from google.protobuf import json_format

    from mlpe.v1 import control_pb2

    spec = control_pb2.JobSpec()
    if args.spec:
        try:
            json_format.Parse(args.spec.read_text(), spec)
        except (OSError, json_format.ParseError) as err:
            raise ValueError(f"--spec {args.spec}: {err}") from None
    simple = {"name": "name", "steps": "steps", "global_batch": "global_batch",
              "micro_batch": "micro_batch", "world_size": "world_size",
              "precision": "precision", "recompute": "recompute", "device": "device",
              "priority": "priority", "max_restarts": "max_restarts",
              "hang_timeout": "hang_timeout_s", "seed": "seed",
              "kernel_report_steps": "kernel_report_steps"}
    for arg, field in simple.items():
        if getattr(args, arg) is not None:
            setattr(spec, field, getattr(args, arg))
    if args.script or args.module or args.workdir or args.env or args.script_args:
        e = spec.entrypoint
        e.SetInParent()
        if args.script:
            e.script = str(args.script.resolve())
            spec.name = spec.name or args.script.name  # the list shows it
        if args.module:
            e.module = args.module
        if args.workdir:
            e.working_dir = str(args.workdir.resolve())
        for pair in args.env:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"--env {pair!r}: expected KEY=VALUE")
            e.env[key] = value
        e.args.extend(args.script_args)
    if args.preset is not None:
        spec.model.preset = args.preset
    for arg in ("layers", "hidden", "heads", "kv_heads", "vocab", "seq_len"):
        if getattr(args, arg) is not None:
            setattr(spec.model, arg, getattr(args, arg))
    if args.hf_config is not None:
        inline = args.hf_config.lstrip().startswith("{")
        spec.model.hf_config = args.hf_config if inline else \
            str(Path(args.hf_config).resolve())
    if args.hf_pretrained is not None:
        spec.model.hf_pretrained = str(args.hf_pretrained.resolve())
    if args.no_mlpe_kernels:
        spec.model.hf_mlpe_kernels = False
    if args.parallelism is not None:
        spec.parallelism.kind = args.parallelism
    if args.no_reshard_after_forward:
        spec.parallelism.reshard_after_forward = False
    if args.cpu_offload:
        spec.parallelism.cpu_offload = True
    if args.data:
        spec.data.kind, spec.data.path = "file", str(Path(args.data).resolve())
    for arg, field in (("lr", "lr"), ("warmup_steps", "warmup_steps"),
                       ("schedule", "schedule")):
        if getattr(args, arg) is not None:
            setattr(spec.optimizer, field, getattr(args, arg))
    for arg, field in (("ckpt_every", "every_steps"), ("ckpt_seconds", "every_seconds"),
                       ("keep", "keep")):
        if getattr(args, arg) is not None:
            setattr(spec.checkpoint, field, getattr(args, arg))
    for pair in args.label:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--label {pair!r}: expected KEY=VALUE")
        spec.labels[key] = value
    if args.budget is not None:
        spec.budget.amount = args.budget
    if args.budget_policy is not None:
        spec.budget.policy = args.budget_policy
    return spec


def describe(job) -> dict:
    from google.protobuf import json_format

    from mlpe.control.store import state_name

    d = json_format.MessageToDict(job, preserving_proto_field_name=True)
    d["state"] = state_name(job.state)
    return d


def print_jobs(jobs) -> None:
    from mlpe.control.store import state_name

    print(f"{'JOB':14s} {'STATE':10s} {'STEP':>13s} {'LOSS':>8s} {'TOK/S':>9s} "
          f"{'CKPT':>6s} {'RESTARTS':>8s}  NAME / MESSAGE")
    for j in jobs:
        steps = f"{j.step}/{j.spec.steps or '?'}"
        extra = (f"#{j.queue_position} in queue" if j.queue_position else
                 (j.message.splitlines() or [""])[0])
        print(f"{j.job_id:14s} {state_name(j.state):10s} {steps:>13s} {j.loss:8.4f} "
              f"{j.tokens_per_s:9.0f} {j.checkpoint_step:6d} {j.restarts:8d}  "
              f"{j.spec.name or '-'}: {extra}")


def print_cost(cost) -> None:
    from mlpe.control.costs import summary

    budget = (f"; budget {cost.budget:g} {cost.currency} ({cost.total / cost.budget:.0%} "
              "spent)" if cost.budget else "")
    print(f"Cost: {summary(cost)}{budget}")
    if cost.gpus:
        print(f"Time: useful {cost.useful_s:,.1f} s, lost to failures {cost.failure_s:,.1f} s, "
              f"paused {cost.paused_s:,.1f} s{f' (now {cost.phase})' if cost.phase else ''}")


def follow(stub, job_id: str, as_json: bool) -> int:
    from mlpe.control.store import state_name
    from mlpe.v1 import control_pb2

    last = None
    for event in stub.StreamJobEvents(control_pb2.StreamJobEventsRequest(job_id=job_id)):
        if as_json:
            print(json.dumps({"id": event.id, "kind": event.kind, "state":
                              state_name(event.state), "step": event.step,
                              "loss": event.loss, "message": event.message,
                              "time_ns": event.time_ns}), flush=True)
            continue
        when = time.strftime("%H:%M:%S", time.localtime(event.time_ns / 1e9))
        if event.kind == "step":
            print(f"\r{when} step {event.step:>7d}  loss {event.loss:8.4f}", end="",
                  flush=True)
            last = "step"
            continue
        if last == "step":
            print()
        print(f"{when} {event.kind:10s} {state_name(event.state):10s} {event.message}",
              flush=True)
        last = event.kind
    if last == "step":
        print()
    job = stub.GetJob(control_pb2.JobRequest(job_id=job_id))
    return 0 if job.state == control_pb2.JOB_STATE_COMPLETED else 1


def run(args, settings: Settings) -> int:
    import grpc

    from mlpe.common.grpc_server import control_channel
    from mlpe.control.store import S
    from mlpe.v1 import control_pb2, control_pb2_grpc

    metadata = [("mlpe-user", getpass.getuser())]
    token = control_token(settings)
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    stub = control_pb2_grpc.TrainingControlStub(control_channel(settings))
    try:
        if args.action == "submit":
            try:
                spec = build_spec(args)
            except ValueError as err:
                print(f"mlpe jobs submit: {err}", file=sys.stderr)
                return 2
            job = stub.SubmitJob(control_pb2.SubmitJobRequest(spec=spec), metadata=metadata)
            print(json.dumps(describe(job)) if args.json else
                  f"submitted {job.job_id} ({'queued #' + str(job.queue_position)})")
            return follow(stub, job.job_id, args.json) if args.follow else 0
        if args.action == "list":
            states = [S.Value(f"JOB_STATE_{s.upper()}") for s in args.state]
            jobs = stub.ListJobs(control_pb2.ListJobsRequest(states=states, limit=args.limit),
                                 metadata=metadata).jobs
            if args.json:
                print(json.dumps([describe(j) for j in jobs]))
            else:
                print_jobs(jobs)
            return 0
        if args.action == "events":
            return follow(stub, args.job_id, args.json)
        call = {"status": stub.GetJob, "pause": stub.PauseJob, "resume": stub.ResumeJob,
                "cancel": stub.CancelJob, "checkpoint": stub.CheckpointNow}[args.action]
        job = call(control_pb2.JobRequest(job_id=args.job_id), metadata=metadata)
        if args.json:
            print(json.dumps(describe(job)))
        else:
            print_jobs([job])
            if job.HasField("cost"):
                print_cost(job.cost)
            if "\n" in job.message:  # a failure's last output, below the table
                print(job.message.split("\n", 1)[1])
        return 0
    except grpc.RpcError as err:
        code = err.code()
        hint = (f" (is `mlpe control` running at {settings.control_address}?)"
                if code == grpc.StatusCode.UNAVAILABLE else "")
        print(f"mlpe jobs {args.action}: {code.name}: {err.details()}{hint}", file=sys.stderr)
        return {grpc.StatusCode.INVALID_ARGUMENT: 2, grpc.StatusCode.UNAVAILABLE: 3,
                grpc.StatusCode.NOT_FOUND: 4}.get(code, 1)
    except KeyboardInterrupt:
        return 130
