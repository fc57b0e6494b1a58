"""The planner's entry point: `search` ranks the layouts of a model on a cluster (search.py)
and, when nothing fits or only with offload, says what would (suggest.py). The two are
joined here because the suggestions search again, on changed clusters."""

from __future__ import annotations

import math
import statistics
import time

from mlpe.optimizer.hardware import Cluster, parse_cluster
from mlpe.optimizer.models import ModelShape, build_model
from mlpe.optimizer.search import SearchResult, Training, build_training, rank_layouts
from mlpe.optimizer.suggest import no_layout, what_would_fit


def search(model: ModelShape, cluster: Cluster, training: Training,
           objective: str = "throughput", top_k: int = 10,
           suggest: bool = True) -> SearchResult:
    """Rank the layouts of `model` on `cluster` for `training` (see search.rank_layouts);
    when nothing fits, `closest` is the candidate with the smallest overflow and
    `suggestions` say what would fit."""
    started = time.perf_counter()
    result = rank_layouts(model, cluster, training, objective, top_k)
    if not result.plans and result.closest is None:
        result.suggestions = [no_layout(cluster, result.rejected)]
    elif suggest and (result.closest is not None or result.plans[0].offload != "none"):
        result.suggestions = what_would_fit(model, cluster, training, result.closest,
                                            result.plans)
    result.elapsed_ms = (time.perf_counter() - started) * 1e3
    return result


def search_latency_ms(repeats: int = 50, model: str = "llama3-70b",
                      cluster: str = "128x8xH100", global_batch: int = 1024,
                      seq_len: int = 8192, objective: str = "throughput") -> dict[str, float]:
    """Wall time of `search` in this process: {"p50", "p99", "max", "repeats",
    "candidates"} in milliseconds (one warm-up call first)."""
    shape = build_model(model)
    where = parse_cluster(cluster)
    training = build_training(global_batch, seq_len)
    result = search(shape, where, training, objective)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        search(shape, where, training, objective)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    p99 = samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)]
    return {"p50": statistics.median(samples), "p99": p99, "max": samples[-1],
            "repeats": repeats, "candidates": result.evaluated}
