"""`mlpe bench …`: benchmarks that print a human summary, then one JSON line of figures.

One module per benchmark (`mlpe bench X` is mlpe/bench/X.py), except the kernels', which
lives with the kernels (mlpe.kernels.bench: that package depends on nothing of mlpe).
Benchmarks drive whole processes against the real stack, so they sit above the services
and import them; no service imports a benchmark."""

from __future__ import annotations

import argparse
import json
import sys

from mlpe.common.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    from mlpe.bench import agent as agent_bench
    from mlpe.bench import detect as bench_detect
    from mlpe.bench import plan as plan_bench
    from mlpe.bench import recovery as recovery_bench
    from mlpe.bench import storage as storage_bench
    from mlpe.bench import stream as stream_bench
    from mlpe.kernels import bench as kernels_bench

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
    storage_bench.register(which)
    p.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    try:
        result = args.bench(args, settings)
    except RuntimeError as err:
        print(f"mlpe bench {args.which}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0
