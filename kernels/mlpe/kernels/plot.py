"""Plot `mlpe bench kernels` CSVs: one column per op; forward bandwidth as a fraction of
the device copy (memory-bound ops) and forward+backward time of each implementation.

    python -m mlpe.kernels.plot kernels/results/*.csv --out kernels/results/kernels.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict

STYLE = {"mlpe": "-o", "eager": "--s", "compile": ":^", "torch_fused": "-.x"}


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    if not rows:
        raise ValueError(f"no rows in {', '.join(paths)}")
    return rows


def plot(rows: list[dict], out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(2, len(ops), figsize=(3.2 * len(ops), 6), squeeze=False)
    for col, op in enumerate(ops):
        series = defaultdict(list)
        for r in rows:
            if r["op"] == op:
                series[r["impl"]].append((int(r["hidden"]), float(r["fwd_bw_fraction"]),
                                          float(r["full_ms"])))
        for impl, points in series.items():
            points.sort()
            xs = [p[0] for p in points]
            axes[0][col].plot(xs, [100 * p[1] for p in points], STYLE.get(impl, "-"),
                              label=impl)
            axes[1][col].plot(xs, [p[2] for p in points], STYLE.get(impl, "-"), label=impl)
        vocab = op in ("cross_entropy", "linear_cross_entropy")
        axes[0][col].set_title(op, fontsize=10)
        axes[0][col].set_ylabel("forward, % of copy bandwidth" if col == 0 else "")
        axes[1][col].set_ylabel("forward + backward, ms" if col == 0 else "")
        axes[1][col].set_yscale("log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
        axes[1][col].set_xlabel("vocabulary" if vocab else "hidden")
    axes[0][0].legend(fontsize=8)
    first = rows[0]
    fig.suptitle(title or f"mlpe kernels, {first['tokens']} tokens, {first['dtype']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlpe.kernels.plot", description=__doc__)
    p.add_argument("csv", nargs="+", help="CSV files written by `mlpe bench kernels --csv`")
    p.add_argument("--out", required=True, help="image to write (.png or .svg)")
    p.add_argument("--title", default="", help="figure title (default: tokens and dtype)")
    args = p.parse_args(argv)
    try:
        plot(load(args.csv), args.out, args.title)
    except (OSError, ValueError, KeyError) as err:
        p.error(f"cannot plot: {err}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
