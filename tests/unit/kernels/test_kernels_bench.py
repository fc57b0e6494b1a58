"""The kernel benchmark without a GPU: says so, exits cleanly, final JSON with gpu null.
Run as the kernel package's own command (`python -m mlpe.kernels.bench`): these tests
also run against `pip install ./kernels` alone; `mlpe bench kernels` is the same parser."""

import json
import subprocess
import sys

import pytest
import torch


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    from mlpe.kernels.bench import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run([1024], 8, torch.bfloat16, None)
    assert "no CUDA GPU here" in capsys.readouterr().out
    assert result == {"bench": "kernels", "gpu": None, "min_bw_fraction": None,
                      "worst_speed_vs_compile": None, "ce_mem_vs_eager": None,
                      "linear_ce_mem_vs_eager": None}


def test_cli_refuses_bad_sizes_by_name():
    done = subprocess.run([sys.executable, "-m", "mlpe.kernels.bench", "--hidden", "4k"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--hidden '4k'" in done.stderr
    if not torch.cuda.is_available():
        ok = subprocess.run([sys.executable, "-m", "mlpe.kernels.bench"],
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and json.loads(ok.stdout.splitlines()[-1])["gpu"] is None


def test_every_case_builds_and_its_impls_agree_on_the_cpu():
    """The benchmark's inputs and calls, run once on the CPU (ours = the reference here):
    a case that cannot even be built would otherwise only be found on a GPU machine."""
    from mlpe.kernels.bench import OPS, VOCAB_OPS, _case

    for op in OPS:
        size = 512 if op in VOCAB_OPS else 256
        leaves, impls, bytes_fwd, bytes_bwd = _case(op, 16, size, torch.float32, device="cpu",
                                                    lm_hidden=64)
        assert set(impls) >= {"mlpe", "eager", "compile"}
        if leaves is None:  # the optimizer: one step of each moves the same parameters
            before = impls["mlpe"].__self__.param_groups[0]["params"][0].clone()
            impls["mlpe"](), impls["eager"]()
            ours = impls["mlpe"].__self__.param_groups[0]["params"][0]
            theirs = impls["eager"].__self__.param_groups[0]["params"][0]
            assert not torch.equal(ours, before)
            torch.testing.assert_close(ours, theirs)
            assert bytes_fwd == 8 * size * size * (3 * 4 + 16)
            continue
        ours, theirs = impls["mlpe"](), impls["eager"]()
        for a, b in zip(ours if isinstance(ours, tuple) else [ours],
                        theirs if isinstance(theirs, tuple) else [theirs], strict=True):
            torch.testing.assert_close(a, b)
        assert all(t.requires_grad for t in leaves) and bytes_fwd >= 0 and bytes_bwd >= 0


def test_plot_draws_a_csv_and_refuses_an_empty_one(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs mlpe-kernels[plot]")
    from mlpe.kernels.plot import main

    rows = tmp_path / "rows.csv"
    rows.write_text("op,impl,hidden,tokens,dtype,fwd_bw_fraction,full_ms\n"
                    + "".join(f"rmsnorm,{impl},{h},8,bfloat16,0.{h % 7 + 1},{h / 1000}\n"
                              for impl in ("mlpe", "eager") for h in (1024, 4096)))
    out = tmp_path / "k.png"
    assert main([str(rows), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty.csv"
    empty.write_text("op,impl\n")
    with pytest.raises(SystemExit):
        main([str(empty), "--out", str(tmp_path / "e.png")])
