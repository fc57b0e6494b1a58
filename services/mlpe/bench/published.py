"""The planner against published training runs (published_runs.yaml): each run's layout
evaluated as `mlpe plan --layout` does, its predicted tokens/s against the measured, and
the step-time model's constants fitted on some runs and judged on the others.

A run's measured throughput is given as its authors give it: TFLOP/s per GPU under the
Megatron-LM count (`flops: megatron`, 96 B s l h² (1 + s/6h + V/16lh) per step,
activation recomputation included: Narayanan et al. 2021, appendix) or as MFU under the
planner's own count (`mfu`: 6 N + 12 L h s per token, as the Llama 3 paper reports it).
Both become tokens/s, which the prediction is compared with.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from pathlib import Path

import yaml

from mlpe.optimizer import fixed
from mlpe.optimizer.hardware import Cluster, parse_cluster
from mlpe.optimizer.models import ModelShape, build_model
from mlpe.optimizer.search import Training, build_training
from mlpe.optimizer.timing import CONSTANTS, Constants, mfu_peak_tflops

RUNS_FILE = Path(__file__).with_name("published_runs.yaml")
# The constants fitted, and the values tried (around the shipped ones).
GRID = {"achievable:a100-80gb": (0.55, 0.60, 0.65, 0.70, 0.75, 0.80),
        "achievable:h100-sxm": (0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85),
        "link_efficiency": (0.6, 0.7, 0.8, 0.9),
        "dp_overlap": (0.6, 0.8, 0.9),
        "gemm_knee": (64.0, 128.0, 192.0, 256.0)}


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    source: str
    model: ModelShape
    cluster: Cluster
    layout: str
    training: Training
    measured_tokens_per_s: float
    fit: bool  # used to fit the constants (else: held out, judged)
    assumed: tuple[str, ...] = ()  # what the source does not say

    def predicted_tokens_per_s(self, k: Constants = CONSTANTS,
                               achievable: dict[str, float] | None = None) -> float:
        cluster = self.cluster
        if achievable and cluster.gpu.name in achievable:
            cluster = dataclasses.replace(cluster, gpu=dataclasses.replace(
                cluster.gpu, achievable=achievable[cluster.gpu.name]))
        verdict = fixed.evaluate(self.model, cluster, self.training,
                                 fixed.parse_layout(self.layout), k, nearest=False)
        if verdict.plan is None:
            raise ValueError(f"{self.name}: {'; '.join(verdict.problems)}")
        return verdict.plan.tokens_per_s


def load(path: Path = RUNS_FILE) -> list[Run]:
    """The runs of the file, checked; a bad entry raises ValueError naming it."""
    entries = yaml.safe_load(path.read_text())
    runs = []
    for i, entry in enumerate(entries):
        where = f"{path.name}: run {i + 1} ({entry.get('name', '?')})"
        try:
            model = build_model(None, **entry["model"])
            cluster = parse_cluster(entry["cluster"])
            training = build_training(entry["global_batch"], entry["model"]["seq_len"],
                                      entry.get("precision", "bf16"))
            measured = entry["measured"]
            tokens_step = training.global_batch * training.seq_len
            if "tflops_per_gpu" in measured:
                if measured.get("flops") != "megatron":
                    raise ValueError("tflops_per_gpu needs flops: megatron")
                b, s, h, layers, v = (training.global_batch, training.seq_len, model.hidden,
                                      model.layers, model.vocab)
                step_flops = 96 * b * s * layers * h * h * (1 + s / (6 * h)
                                                            + v / (16 * layers * h))
                step_s = step_flops / (cluster.world * measured["tflops_per_gpu"] * 1e12)
                tokens_per_s = tokens_step / step_s
            else:
                peak = mfu_peak_tflops(cluster.gpu, training.precision) * 1e12
                tokens_per_s = (measured["mfu"] * cluster.world * peak
                                / model.flops_per_token(training.seq_len))
            runs.append(Run(entry["name"], entry["source"], model, cluster, entry["layout"],
                            training, tokens_per_s, bool(entry["fit"]),
                            tuple(entry.get("assumed", ()))))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: {type(err).__name__}: {err}") from None
    return runs


def _errors(runs: list[Run], k: Constants, achievable: dict[str, float]) -> list[float]:
    return [100 * (r.predicted_tokens_per_s(k, achievable) - r.measured_tokens_per_s)
            / r.measured_tokens_per_s for r in runs]


def calibrate(runs: list[Run]) -> tuple[Constants, dict[str, float]]:
    """The constants of GRID that minimise the median absolute error over the fitting
    runs (then the largest, then the distance from the shipped values)."""
    fitting = [r for r in runs if r.fit]
    best = None
    for values in itertools.product(*GRID.values()):
        chosen = dict(zip(GRID, values, strict=True))
        achievable = {key.split(":")[1]: v for key, v in chosen.items()
                      if key.startswith("achievable:")}
        k = dataclasses.replace(CONSTANTS, **{key: v for key, v in chosen.items()
                                              if ":" not in key})
        errors = [abs(e) for e in _errors(fitting, k, achievable)]
        score = (statistics.median(errors), max(errors))
        if best is None or score < best[0]:
            best = (score, k, achievable)
    return best[1], best[2]


def report(runs: list[Run], k: Constants = CONSTANTS,
           achievable: dict[str, float] | None = None) -> dict:
    """Per run: measured and predicted tokens/s and the error; p50 / max of the absolute
    error over the held-out runs (and over the fitting ones, apart)."""
    rows, held, fitted = [], [], []
    for run, err in zip(runs, _errors(runs, k, achievable or {}), strict=True):
        rows.append({"name": run.name, "source": run.source, "gpus": run.cluster.world,
                     "gpu": run.cluster.gpu.name, "layout": run.layout,
                     "measured_tokens_per_s": round(run.measured_tokens_per_s),
                     "predicted_tokens_per_s": round(run.predicted_tokens_per_s(
                         k, achievable)),
                     "error_pct": round(err, 1), "used_to_fit": run.fit,
                     "assumed": list(run.assumed)})
        (fitted if run.fit else held).append(abs(err))
    return {"published_runs": rows,
            "published_err_p50_pct": round(statistics.median(held), 1) if held else None,
            "published_err_max_pct": round(max(held), 1) if held else None,
            "published_fit_err_p50_pct": round(statistics.median(fitted), 1) if fitted
            else None}
