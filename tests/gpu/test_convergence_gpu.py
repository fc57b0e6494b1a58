"""The small GPT trained 50 steps with the fused ops (and fused AdamW) gives the loss
curve of the plain-PyTorch references within tolerance. On a GPU here; the interpreter
test in tests/unit/worker/interpreted runs the same loop on the CPU through Triton's interpreter."""

import pytest
import torch

from mlpe.common.jobs import GPTConfig
from mlpe.kernels import dispatch
from tests.convergence import train_losses

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]


def with_backend(monkeypatch, choice: str) -> None:
    monkeypatch.setenv("MLPE_KERNELS", choice)
    dispatch.backend.cache_clear()
    dispatch.interpreting.cache_clear()


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-3),
                                                  (torch.bfloat16, 5e-2)], ids=str)
def test_fused_and_reference_give_the_same_loss_over_50_steps(monkeypatch, dtype, tolerance):
    cfg = GPTConfig(vocab=4096, seq_len=256, layers=4, hidden=256, heads=8, kv_heads=4)
    with_backend(monkeypatch, "auto")
    fused = train_losses(cfg, 50, 8, "cuda", dtype)
    with_backend(monkeypatch, "reference")
    reference = train_losses(cfg, 50, 8, "cuda", dtype, fused_optimizer=False)
    dispatch.backend.cache_clear()
    assert reference[-1] < reference[0] - 1.0  # it learns: the comparison means something
    worst = max(abs(a - b) for a, b in zip(fused, reference, strict=True))
    assert worst <= tolerance * max(reference), (worst, fused[::10], reference[::10])
