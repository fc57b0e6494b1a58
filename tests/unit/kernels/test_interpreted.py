"""The Triton kernels run by Triton's interpreter on the CPU (tests in interpreted/, in a
pytest of their own: tests/interpreter.py)."""

import re
from pathlib import Path

import pytest

from tests.interpreter import run_interpreted


def test_every_kernel_matches_its_reference_in_the_interpreter():
    pytest.importorskip("triton")
    done = run_interpreted(Path(__file__).parent / "interpreted")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 10, done.stdout[-2000:]  # 6 ops, 4 AdamW cases
    assert "skipped" not in done.stdout, done.stdout[-2000:]
