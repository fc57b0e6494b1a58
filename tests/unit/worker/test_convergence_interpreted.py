"""Training with the fused kernels under Triton's interpreter matches the reference (the
test itself is in interpreted/, run in a pytest of its own: tests/interpreter.py)."""

from pathlib import Path

import pytest

from tests.interpreter import run_interpreted


@pytest.mark.slow  # about a minute: 60 training steps, half of them interpreted
def test_fused_training_matches_the_reference_in_the_interpreter():
    pytest.importorskip("triton")
    done = run_interpreted(Path(__file__).parent / "interpreted")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout, done.stdout[-2000:]
