"""The examples run unchanged without mlpe control: under bare torchrun (2 ranks) and
plain python, checkpointing into ./checkpoints and resuming from it."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # each example trains twice in processes of its own

EXAMPLES = REPO_ROOT / "examples"


def run(cmd: list[str], cwd) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_the_mlp_under_bare_torchrun_then_resumed(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2"]
    out = run([*torchrun, str(EXAMPLES / "train_mlp.py"), "--steps", "50"], tmp_path)
    assert "step 50: loss" in out
    newest = tmp_path / "checkpoints" / "step-00000050"
    assert json.loads((newest / "manifest.json").read_text())["step"] == 50
    # Run again with more steps: it resumes from step 50 instead of starting over.
    out = run([*torchrun, str(EXAMPLES / "train_mlp.py"), "--steps", "60"], tmp_path)
    assert "step 50" not in out and "step 60: loss" in out


def test_the_language_model_under_plain_python(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "train_lm.py"), "--steps", "25"], tmp_path)
    first = float(out.split("step 25: loss ")[1].split()[0])
    assert first < 4.85  # below ln(128), a uniform guess: it learned something
    assert (tmp_path / "checkpoints" / "step-00000025" / "manifest.json").is_file()


def test_the_hugging_face_llama_sharded_under_torchrun_then_resumed(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2"]
    script = str(EXAMPLES / "train_hf_llama.py")
    out = run([*torchrun, script, "--steps", "40"], tmp_path)
    assert "fused_linear_cross_entropy: 1 LlamaForCausalLM" in out  # patched in one call
    assert float(out.split("step 40: loss ")[1].split()[0]) < 4.85  # below ln(128)
    manifest = json.loads((tmp_path / "checkpoints" / "step-00000040" /
                           "manifest.json").read_text())
    assert manifest["format"] == "dcp" and {"__0_0.distcp", "__1_0.distcp"} <= set(
        manifest["files"])  # each rank wrote its own shard
    out = run([*torchrun, script, "--steps", "50"], tmp_path)
    assert "step 40" not in out and "step 50: loss" in out
