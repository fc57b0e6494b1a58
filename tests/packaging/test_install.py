"""mlpe as a user installs it, not as the clone runs it: a wheel (not editable) in a fresh
virtual environment used from another folder, and the kernel package on its own. uv
installs from its per-user cache (deploy/setup-python.sh put everything there), so
nothing is downloaded again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, mlpe_env, uv

pytestmark = pytest.mark.slow  # two virtual environments with torch in them


def run(*argv, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=mlpe_env(PYTHONPATH=None, VIRTUAL_ENV=None))
    assert done.returncode == 0, f"{argv}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def venv(path: Path, *install: str) -> Path:
    run(uv(), "venv", "--quiet", "--python", "3.11", path, cwd=path.parent)
    python = path / "bin" / "python"
    run(uv(), "pip", "install", "--quiet", "--python", python, *install, cwd=REPO_ROOT,
        timeout=900)
    return python


def test_the_wheel_works_outside_the_clone(tmp_path):
    python = venv(tmp_path / "venv", ".", "-c", "requirements-runtime.lock")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mlpe = tmp_path / "venv" / "bin" / "mlpe"
    assert "stack" in run(mlpe, "--help", cwd=elsewhere).stdout
    assert "Faust worker" in run(mlpe, "stream", "--help", cwd=elsewhere).stdout
    plan = run(mlpe, "plan", "--model", "llama3-8b", "--cluster", "1x8xH100",
               "--global-batch", "8", cwd=elsewhere).stdout
    assert "TP" in plan and "MEM GiB" in plan and "layouts evaluated" in plan, plan
    # Installed, not the clone's files: the code and its data come from site-packages.
    where = run(python, "-c", "import mlpe.stack, mlpe.agent.scenario as s; "
                "from mlpe.common.settings import packaged; "
                "print(mlpe.stack.__file__); print(packaged('kafka', 'pom.xml')); "
                "print(s.packaged('run.yaml'))", cwd=elsewhere).stdout.split()
    assert all(str(tmp_path / "venv") in w and Path(w).exists() for w in where), where
    assert "kafka" in run(mlpe, "version", cwd=elsewhere).stdout


def test_the_kernel_package_installs_and_passes_its_cpu_tests_alone(tmp_path):
    # [interpret]: numpy, which Triton's interpreter (the CPU tests of the kernels) needs.
    python = venv(tmp_path / "venv", "./kernels[interpret]", "pytest", "-c",
                  "requirements.lock")
    found = run(python, "-c", "import importlib.util as u, mlpe.kernels; "
                "print(mlpe.kernels.__file__, u.find_spec('mlpe.common'))",
                cwd=tmp_path).stdout.split()
    assert str(tmp_path / "venv") in found[0] and found[1] == "None"  # nothing else of mlpe
    tests = run(python, "-m", "pytest", "tests/unit/kernels", "-q", "-p", "no:cacheprovider",
                cwd=REPO_ROOT, timeout=900)
    assert " passed" in tests.stdout and " failed" not in tests.stdout, tests.stdout[-2000:]
