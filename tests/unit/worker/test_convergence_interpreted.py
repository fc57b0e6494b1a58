"""50 training steps of a tiny GPT with every Triton kernel (and fused AdamW) run by
Triton's interpreter on the CPU give the reference's loss curve (the GPU test does the
same at a larger size). In a subprocess: the interpreter is chosen at import."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

GPU_TESTS = Path(__file__).resolve().parents[2] / "gpu"
CHECK = f"""
import os, sys
sys.path.insert(0, {str(GPU_TESTS)!r})
from test_convergence_gpu import train_losses
from mlpe.kernels import dispatch
from mlpe.worker.model import GPTConfig

cfg = GPTConfig(vocab=96, seq_len=16, layers=2, hidden=32, heads=4, kv_heads=2)
assert dispatch.interpreting()
fused = train_losses(cfg, 50, 2, "cpu")
os.environ["MLPE_KERNELS"] = "reference"
dispatch.backend.cache_clear()
dispatch.interpreting.cache_clear()
reference = train_losses(cfg, 50, 2, "cpu", fused_optimizer=False)
assert reference[-1] < reference[0] - 1.0, reference
worst = max(abs(a - b) for a, b in zip(fused, reference, strict=True))
assert worst <= 1e-4, (worst, fused[::10], reference[::10])
print("ok")
"""


def test_fused_training_matches_the_reference_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "MLPE_KERNELS": "triton"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
