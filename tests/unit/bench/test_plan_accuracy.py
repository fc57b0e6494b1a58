"""The worker's memory model measured on the real GPT: the fused kernels (Triton's
interpreter, in a subprocess) and the PyTorch references, both within 5 %."""

import pytest

from mlpe.bench.plan_accuracy import accuracy_table, format_table, measure_saved_bytes
from mlpe.optimizer.memory import worker_activation_bytes

pytest.importorskip("triton")

CONFIGS = [
    ({"vocab": 128, "seq_len": 16, "layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2},
     2, 16),
    ({"vocab": 160, "seq_len": 32, "layers": 2, "hidden": 48, "heads": 4, "kv_heads": 1,
      "ffn": 96, "tied": True, "recompute": "full"}, 1, 24),
]


def test_measured_matches_predicted_on_both_kernel_paths():
    rows = accuracy_table(CONFIGS, paths=(True, False))
    print("\n" + format_table(rows))
    assert len(rows) == 2 * len(CONFIGS) * 4
    assert {r["component"] for r in rows} == {"activations", "parameters", "gradients",
                                              "optimizer"}
    for row in rows:
        assert row["measured"] > 0
        assert row["error_pct"] <= 5.0, row
    # Without recomputation the fused path keeps less than the references (no fp32
    # copies in the norms and SiLU, no log-probabilities).
    acts = {r["config"]: r["measured"] for r in rows if r["component"] == "activations"
            and "recompute=none" in r["config"]}
    fused = {k.removesuffix(" fused"): v for k, v in acts.items() if k.endswith(" fused")}
    for key, value in fused.items():
        assert value < acts[key + " reference"]


def test_measure_saved_bytes_reference_in_process():
    from mlpe.common.jobs import GPTConfig

    cfg = GPTConfig(**CONFIGS[0][0])
    measured = measure_saved_bytes(cfg, 3, fused=False, seq=8)
    assert measured == worker_activation_bytes(cfg, 3, 8, 4, "none", fused=False)
