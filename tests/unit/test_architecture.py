"""The layout and the dependency direction that docs/architecture.md describes: every
mlpe package is under a contract, and a wrong import breaks `make lint`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.helpers import REPO_ROOT
from tests.import_all import module_names

CONFIG = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
SOURCE_ROOTS = ("services", "agents", "kernels", "proto")


def packages() -> set[str]:
    """mlpe's top-level packages (mlpe.X), found in the source folders."""
    return {f"mlpe.{d.name}" for root in SOURCE_ROOTS for d in (REPO_ROOT / root / "mlpe").iterdir()
            if d.is_dir() and any(d.glob("*.py"))}


def test_every_package_is_under_the_layers_contract():
    layers = next(c for c in CONFIG["contracts"] if c["type"] == "layers")["layers"]
    layered = {name.strip() for layer in layers for name in layer.split("|")}
    assert set(CONFIG["root_packages"]) == layered
    assert packages() == layered


def test_runtime_code_lives_only_in_the_source_folders():
    for folder in ("deploy", "tests"):
        assert not (REPO_ROOT / folder / "mlpe").exists(), f"{folder}/mlpe: runtime code there"


def lint_imports(tmp_path: Path, broken: tuple[str, str] | None = None):
    """lint-imports over a copy of the sources, with `broken` = (module file, import line)
    appended to one module."""
    for root in SOURCE_ROOTS:
        shutil.copytree(REPO_ROOT / root, tmp_path / root,
                        ignore=shutil.ignore_patterns("__pycache__"))
    if broken:
        path, line = broken
        with (tmp_path / path).open("a") as f:
            f.write(f"\n{line}  # noqa\n")
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(str(tmp_path / r)
                                                            for r in SOURCE_ROOTS)}
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_contracts_hold_and_a_sideways_import_breaks_them(tmp_path):
    assert lint_imports(tmp_path / "clean").returncode == 0
    wrong = lint_imports(tmp_path / "wrong", ("services/mlpe/worker/data.py",
                                              "from mlpe.control import store"))
    assert wrong.returncode != 0
    assert "mlpe.worker is not allowed to import mlpe.control" in wrong.stdout


def test_the_kernel_package_may_not_import_mlpe(tmp_path):
    wrong = lint_imports(tmp_path, ("kernels/mlpe/kernels/tolerances.py",
                                    "import mlpe.common.settings"))
    assert wrong.returncode != 0
    assert "mlpe.kernels.tolerances -> mlpe.common.settings" in wrong.stdout



def test_importing_any_module_reads_no_setting_and_writes_nothing(tmp_path):
    """Settings are read when a command starts, never at import: with a malformed setting
    and a state folder that must not appear, every mlpe module still imports."""
    state = tmp_path / "must-not-exist"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLPE_KAFKA_PORT": "not-a-port",
           "MLPE_STATE_DIR": str(state), "MLPE_RULES": str(tmp_path / "no-rules.yaml")}
    done = subprocess.run([sys.executable, "-m", "tests.import_all"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == len(module_names(REPO_ROOT)) > 100
    assert not state.exists()


def test_the_packaged_deploy_files_are_the_repositorys():
    """The code reads deploy/ files through the wheel's copy (mlpe.deploy); an editable
    install refreshes it only when setup runs again (`make` does when they change)."""
    from mlpe.common.settings import packaged

    copies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["hatch"][
        "build"]["targets"]["wheel"]["force-include"]
    assert copies
    for source, target in copies.items():
        parts = Path(target).relative_to("mlpe/deploy").parts
        assert packaged(*parts).read_bytes() == (REPO_ROOT / source).read_bytes(), source
