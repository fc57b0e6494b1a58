"""`mlpe bench …`: benchmarks that print a human summary, then one JSON line of figures."""

from __future__ import annotations

import argparse
import json
import sys

from mlpe.common.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    from mlpe.agent import bench as agent_bench
    from mlpe.control import bench as recovery_bench
    from mlpe.kernels import bench as kernels_bench
    from mlpe.optimizer import bench as plan_bench
    from mlpe.stream import bench as stream_bench
    from mlpe.stream import bench_detect

    p = sub.add_parser("bench", help="benchmarks (last line of output: JSON figures)",
                       description="Benchmarks against the real stack; each prints a summary "
                       "and, as its last line, a JSON object with its figures.")
    which = p.add_subparsers(dest="which", metavar="BENCHMARK", required=True)
    agent_bench.register(which)
    stream_bench.register(which)
    bench_detect.register(which)
    kernels_bench.register(which)
    recovery_bench.register(which)
    plan_bench.register(which)
    p.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    try:
        result = args.bench(args, settings)
    except RuntimeError as err:
        print(f"mlpe bench {args.which}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0
