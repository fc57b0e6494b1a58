"""`mlpe bench kernels` without a GPU: says so, exits cleanly, final JSON with gpu null."""

import json
import subprocess
import sys

import torch


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    from mlpe.kernels.bench import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run([1024], 8, torch.bfloat16, None)
    assert "no CUDA GPU here" in capsys.readouterr().out
    assert result == {"bench": "kernels", "gpu": None, "min_bw_fraction": None,
                      "worst_speed_vs_compile": None, "ce_mem_vs_eager": None}


def test_cli_refuses_bad_sizes_by_name():
    done = subprocess.run([sys.executable, "-m", "mlpe.cli", "bench", "kernels", "--hidden",
                           "4k"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "--hidden '4k'" in done.stderr
    if not torch.cuda.is_available():
        ok = subprocess.run([sys.executable, "-m", "mlpe.cli", "bench", "kernels"],
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and json.loads(ok.stdout.splitlines()[-1])["gpu"] is None
