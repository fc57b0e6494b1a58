"""`make gpu-check`: every GPU check of the project in one run that fits a short GPU slot.

    python tests/gpu/check.py [--out DIR] [--budget-s 360] [--only a,b] [--dry-run]

Without a CUDA GPU it prints one line and exits 0. With one it runs, one after the other,
each step in its own process with its own time limit (the limits add up to --budget-s):

  gpu_tests     pytest tests/gpu (all GPU tests; pytest-xdist workers when it imports)
  kernel_bench  python -m mlpe.kernels.bench, eager / torch.compile / Liger-Kernel / ours
  calibration   the worker's GPT trained a few steps in bf16 on >= 10 configurations: peak
                torch.cuda.max_memory_allocated() and step time against the planner's
                predictions (mlpe.optimizer.memory / timing) for this GPU, error in %
  nvml          the agent's NVML source (mlpe.agent.sources.nvml): CPU microseconds per
                sampling tick of all GPUs, at 100 Hz as the agent samples
  fsdp_llama    FSDP2 (fully_shard, world size 1) on a ~200M-parameter Hugging Face Llama,
                unpatched vs mlpe.kernels.hf.apply_mlpe_kernels: steps/s and peak memory

Results go to DIR/<UTC time>-<GPU name>/ (DIR: kernels/results/gpu-check): summary.json
(the command line, GPU, versions, every step's status, time, figures and output file) and
each step's raw output. A step that fails is recorded with its error and the next one runs;
the exit status is 0 only if every step passed.

The GPU machine reaches no package registry: `make gpu-wheels` downloads here, into
.gpu-wheels/ (git-ignored, carried to the machine), the wheels these steps need beyond torch
and Triton; this script installs those the machine lacks (or has older) with
`pip install --no-deps --no-index --find-links .gpu-wheels --target .gpu-site/cpXY` and
puts that folder first on every step's PYTHONPATH, with kernels:services:agents:proto.
The machine's torch and Triton are never touched. Only the standard library is imported
here at the top: each step imports what it needs, in its own process.

--dry-run runs every step's code path without a GPU (the external commands in a cheap form,
the in-house steps on the CPU with tiny models) into a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
WHEELS = ROOT / ".gpu-wheels"
SITE = ROOT / ".gpu-site"
RESULTS = ROOT / "kernels" / "results" / "gpu-check"
PROJECT_PATHS = ("kernels", "services", "agents", "proto")
NO_GPU = ("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to "
          "check")
MIB = 2**20
GIB = 2**30

# -- the wheels -------------------------------------------------------------------------------
# What the steps import beyond torch and Triton (transformers' and Liger's own needs, pytest,
# NVML, protobuf for mlpe.v1), resolved per Python by uv against requirements.lock.
REQUIREMENTS = ("transformers", "liger-kernel==0.8.5", "nvidia-ml-py", "protobuf", "numpy",
                "pyyaml", "pytest", "pytest-timeout", "pytest-xdist")
# Pinned where the lock has no pin, or the lock's pin fails on a Python (3.10): the
# packages whose versions must go together.
CORE = ("transformers", "huggingface-hub", "tokenizers", "safetensors", "protobuf", "pytest",
        "nvidia-ml-py", "pytest-timeout", "pytest-xdist")
PYTHONS = ("3.10", "3.11", "3.12")
NUMPY_PYTHONS = ("3.11", "3.12")  # the project's own (requires-python); 17 MB a wheel
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# Not carried: torch, Triton and what installing torch brings (the machine has torch), and
# what nothing the steps run imports (huggingface-hub's and transformers' command lines).
MACHINE_HAS = re.compile(r"^(torch|triton|nvidia-(?!ml-py$).*|cuda-.*|setuptools|sympy|mpmath|"
                         r"networkx|jinja2|markupsafe|filelock|fsspec|typing-extensions)$")
NOT_IMPORTED = {"typer", "click", "rich", "pydantic", "pydantic-core", "hf-xet",
                "markdown-it-py", "mdurl", "shellingham", "annotated-doc", "annotated-types",
                "typing-inspection"}
MAX_WHEELS_BYTES = 64 * MIB
# Installed from the wheels even when the machine has another version: they must match
# what mlpe.kernels.hf and the bench were written against. numpy only where missing (other
# compiled packages there were built against the machine's); the rest where missing or older.
PINNED = {"transformers", "liger-kernel", "huggingface-hub", "tokenizers", "safetensors",
          "protobuf"}
ONLY_IF_MISSING = {"numpy"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_key(version: str) -> tuple:
    """Release numbers first ('26.10.19.post1' -> (26, 10, 19)); enough to order pins."""
    release = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(p) for p in release.group(0).split(".")) if release else ()


@dataclasses.dataclass(frozen=True)
class Wheel:
    path: Path
    dist: str  # normalized
    version: str
    pythons: tuple[str, ...]
    abis: tuple[str, ...]
    platforms: tuple[str, ...]

    @classmethod
    def parse(cls, path: Path) -> Wheel | None:
        parts = path.name[:-len(".whl")].split("-") if path.name.endswith(".whl") else []
        if len(parts) not in (5, 6):
            return None
        dist, version, py, abi, plat = parts[0], parts[1], *parts[-3:]
        return cls(path, normalize(dist), version, tuple(py.split(".")),
                   tuple(abi.split(".")), tuple(plat.split(".")))

    def fits(self, python: tuple[int, int]) -> bool:
        """Installable on CPython `python` (major, minor), manylinux x86_64."""
        if not any(p == "any" or (p.startswith("manylinux") and p.endswith("_x86_64"))
                   for p in self.platforms):
            return False
        ours = python[0] * 100 + python[1]
        for py in self.pythons:
            m = re.fullmatch(r"(py|cp)(\d)(\d*)", py)
            if not m or int(m.group(2)) != python[0]:
                continue
            tag = int(m.group(2)) * 100 + int(m.group(3) or 0)
            for abi in self.abis:
                pure = abi == "none" and (m.group(1) == "py" or tag == ours) and (
                    not m.group(3) or tag <= ours)
                stable = abi == "abi3" and m.group(1) == "cp" and tag <= ours
                if pure or stable or (abi == f"cp{python[0]}{python[1]}" and tag == ours):
                    return True
        return False


def wheels_in(folder: Path) -> list[Wheel]:
    return [w for p in sorted(folder.glob("*.whl")) if (w := Wheel.parse(p))]


def carried(pins: dict[str, str], python: str) -> dict[str, str]:
    """The pins of one Python's resolution that travel to the GPU machine."""
    keep = {}
    for name, version in pins.items():
        n = normalize(name)
        if MACHINE_HAS.match(n) or n in NOT_IMPORTED:
            continue
        if n == "numpy" and python not in NUMPY_PYTHONS:
            continue
        keep[n] = version
    return keep


def parse_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def _pip_for_download(uv: Path) -> list[str]:
    """A pip that can download: the one beside uv (deploy/setup-python.sh installs uv with
    pip into a venv), else pip run by uv."""
    beside = uv.parent / "pip"
    if os.access(beside, os.X_OK):
        return [str(beside)]
    return [str(uv), "tool", "run", "--from", "pip", "pip"]


def download_wheels(uv: Path, dest: Path, pythons: tuple[str, ...] = PYTHONS,
                    lock: Path = ROOT / "requirements.lock") -> int:
    """`make gpu-wheels`: resolve REQUIREMENTS for each Python, download the carried pins'
    wheels (manylinux x86_64, CPython) into dest, drop every other wheel there, write
    dest/manifest.json. Returns the exit status."""
    if not os.access(uv, os.X_OK):
        print(f"gpu-wheels: no uv at {uv} (make setup installs it)", file=sys.stderr)
        return 1
    dest.mkdir(parents=True, exist_ok=True)
    pip = _pip_for_download(uv)
    lock_pins = parse_pins(lock.read_text()) if lock.exists() else {}
    resolved: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="mlpe-gpu-wheels-") as tmp:
        req = Path(tmp, "requirements.in")
        req.write_text("\n".join(REQUIREMENTS) + "\n")
        core = Path(tmp, "core.txt")
        core.write_text("".join(f"{n}=={lock_pins[n]}\n" for n in CORE if n in lock_pins))
        for python in pythons:
            out = Path(tmp, f"pins-{python}.txt")
            base = [str(uv), "pip", "compile", str(req), "--python-version", python,
                    "--python-platform", "x86_64-manylinux_2_28", "--no-header",
                    "--no-annotate", "--quiet", "-o", str(out)]
            done = subprocess.run([*base, "-c", str(lock)], capture_output=True, text=True,
                                  check=False)
            if done.returncode:  # the lock is for 3.11: some pins need a newer Python
                done = subprocess.run([*base, "-c", str(core)], capture_output=True,
                                      text=True, check=False)
            if done.returncode:
                print(f"gpu-wheels: resolving for Python {python} failed:\n{done.stderr}",
                      file=sys.stderr)
                return 1
            resolved[python] = carried(parse_pins(out.read_text()), python)
    for python, pins in resolved.items():
        digits = python.replace(".", "")
        cmd = [*pip, "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               "--abi", f"cp{digits}", "--abi", "abi3", "--abi", "none",
               *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest),
               *[f"{n}=={v}" for n, v in sorted(pins.items())]]
        print(f"gpu-wheels: Python {python}: {len(pins)} wheels", flush=True)
        if subprocess.run(cmd, check=False).returncode:
            print(f"gpu-wheels: downloading for Python {python} failed", file=sys.stderr)
            return 1
    lowest = min(pythons, key=version_key)
    if subprocess.run([*pip, "download", "--quiet", "--disable-pip-version-check",
                       "--no-deps", "--only-binary=:all:", "--python-version", lowest,
                       "-d", str(dest), "pip"], check=False).returncode:
        print("gpu-wheels: downloading pip failed", file=sys.stderr)
        return 1
    keep = wanted_files(wheels_in(dest), resolved)
    for w in wheels_in(dest):
        if w.path.name not in keep:
            w.path.unlink()
    files = {w.path.name: w.path.stat().st_size for w in wheels_in(dest)}
    total = sum(files.values())
    manifest = {"made_utc": utc_now(), "pythons": resolved, "files": files,
                "total_bytes": total}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"gpu-wheels: {len(files)} wheels, {total / MIB:.1f} MiB in {dest}")
    if total > MAX_WHEELS_BYTES:
        print(f"gpu-wheels: more than {MAX_WHEELS_BYTES // MIB} MiB: too much to carry",
              file=sys.stderr)
        return 1
    return 0


def wanted_files(wheels: list[Wheel], resolved: dict[str, dict[str, str]]) -> set[str]:
    """File names of the wheels the resolutions need (each pin on its Python), plus the
    newest pip."""
    keep = set()
    for python, pins in resolved.items():
        py = tuple(int(x) for x in python.split("."))[:2]
        for name, version in pins.items():
            keep |= {w.path.name for w in wheels
                     if w.dist == name and w.version == version and w.fits(py)}
    pips = [w for w in wheels if w.dist == "pip"]
    if pips:
        keep.add(max(pips, key=lambda w: version_key(w.version)).path.name)
    return keep


# -- installing them on the GPU machine ---------------------------------------------------------
def site_dir(python: tuple[int, int] | None = None) -> Path:
    python = python or sys.version_info[:2]
    return SITE / f"cp{python[0]}{python[1]}"


def machine_versions(exclude: Path = SITE) -> dict[str, str]:
    """Distributions this interpreter has (first on sys.path wins), ours excluded."""
    from importlib import metadata

    paths = [p for p in sys.path if not str(Path(p or ".").resolve()).startswith(str(exclude))]
    found: dict[str, str] = {}
    for dist in metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def pins_for(wheels: list[Wheel], manifest: dict, python: tuple[int, int]) -> dict[str, str]:
    """The versions to install on this Python: the manifest's resolution for it, else the
    newest wheel of each distribution that fits."""
    pins = manifest.get("pythons", {}).get(f"{python[0]}.{python[1]}")
    if pins:
        return dict(pins)
    best: dict[str, Wheel] = {}
    for w in wheels:
        if w.dist != "pip" and w.fits(python) and (
                w.dist not in best or version_key(w.version) > version_key(best[w.dist].version)):
            best[w.dist] = w
    return {name: w.version for name, w in best.items()}


def plan_install(pins: dict[str, str], have: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """(to install, kept from the machine), each [{name, version, have, why}]."""
    install, keep = [], []
    for name, version in sorted(pins.items()):
        there = have.get(name)
        row = {"name": name, "version": version, "have": there}
        if there is None:
            install.append({**row, "why": "missing here"})
        elif name in PINNED:
            (install if there != version else keep).append(
                {**row, "why": "pinned" if there != version else "same version"})
        elif name in ONLY_IF_MISSING:
            keep.append({**row, "why": "the machine's (installed only where missing)"})
        elif version_key(there) < version_key(version):
            install.append({**row, "why": f"older here ({there})"})
        else:
            keep.append({**row, "why": "the machine's is as new"})
    return install, keep


def _pip_command(python: str, wheel_dir: Path) -> list[str] | None:
    """The carried pip (run from its wheel), else the machine's, else None."""
    pips = [w for w in wheels_in(wheel_dir) if w.dist == "pip"]
    if pips:
        newest = max(pips, key=lambda w: version_key(w.version))
        return [python, str(newest.path / "pip")]
    probe = subprocess.run([python, "-m", "pip", "--version"], capture_output=True,
                           check=False)
    return [python, "-m", "pip"] if probe.returncode == 0 else None


def unzip_install(wheel: Wheel, target: Path) -> None:
    """What pip --target does for a wheel without scripts: its files, and its .data
    purelib/platlib folders at the top."""
    with zipfile.ZipFile(wheel.path) as z:
        z.extractall(target)
    for data in target.glob("*.data"):
        for kind in ("purelib", "platlib"):
            if (data / kind).is_dir():
                for item in (data / kind).iterdir():
                    shutil.move(str(item), str(target / item.name))
        shutil.rmtree(data)


def install_wheels(rows: list[dict], wheel_dir: Path, target: Path, python: str,
                   use_pip: bool = True) -> tuple[list[str], str]:
    """Install rows (plan_install's) into a fresh `target`; returns (errors, log)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pip = _pip_command(python, wheel_dir) if use_pip else None
    errors, log = [], ""
    reqs = [f"{r['name']}=={r['version']}" for r in rows]
    if pip and reqs:
        base = [*pip, "install", "--no-deps", "--no-index", "--find-links", str(wheel_dir),
                "--target", str(tmp), "--no-compile", "--disable-pip-version-check",
                "--no-warn-script-location", "--quiet"]
        done = subprocess.run([*base, *reqs], capture_output=True, text=True, check=False)
        log = done.stdout + done.stderr
        if done.returncode:  # one at a time, to name the ones that do not install
            for req in reqs:
                one = subprocess.run([*base, "--upgrade", req], capture_output=True,
                                     text=True, check=False)
                if one.returncode:
                    errors.append(f"{req}: {(one.stderr or one.stdout).strip()[-300:]}")
    elif reqs:
        py = sys.version_info[:2]
        wheels = wheels_in(wheel_dir)
        for r in rows:
            match = [w for w in wheels if w.dist == r["name"] and w.version == r["version"]
                     and w.fits(py)]
            if not match:
                errors.append(f"{r['name']}=={r['version']}: no wheel for Python "
                              f"{py[0]}.{py[1]} in {wheel_dir}")
                continue
            unzip_install(match[0], tmp)
        log = "installed by unzipping (no pip here)"
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return errors, log


def setup_site(wheel_dir: Path = WHEELS, target: Path | None = None,
               install_all: bool = False) -> dict:
    """Install what the machine lacks from wheel_dir into target (skipped when the same
    set is there already). Figures for the summary; "error" when something failed."""
    target = target or site_dir()
    python = sys.version_info[:2]
    wheels = wheels_in(wheel_dir) if wheel_dir.is_dir() else []
    if not wheels:
        return {"error": f"no wheels in {wheel_dir}: run `make gpu-wheels` on a machine "
                         "with a registry and carry .gpu-wheels", "site": None}
    manifest_path = wheel_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    pins = pins_for(wheels, manifest, python)
    have = {} if install_all else machine_versions()
    install, keep = plan_install(pins, have)
    stamp_path = target / ".mlpe-stamp.json"
    stamp = json.dumps(install, sort_keys=True)
    figures = {"site": str(target), "installed": install, "kept": keep, "wheels": len(wheels)}
    if stamp_path.exists() and stamp_path.read_text() == stamp:
        return {**figures, "reused": True}
    errors, log = install_wheels(install, wheel_dir, target, sys.executable)
    stamp_path.write_text(stamp if not errors else "")
    figures.update(reused=False, log=log[-2000:])
    if errors:
        figures["error"] = "; ".join(errors)
    return figures


# -- running one step -------------------------------------------------------------------------
def utc_now() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 - the GPU machine's Python may be 3.10
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def run_dir_name(gpu_name: str, when: datetime.datetime | None = None) -> str:
    when = when or datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 - Python 3.10
    return f"{when.strftime('%Y%m%dT%H%M%SZ')}-{slug(gpu_name)}"


def step_env(site: Path | None) -> dict[str, str]:
    """The environment every step runs in: our site first, then the project's folders."""
    paths = ([str(site)] if site else []) + [str(ROOT / p) for p in PROJECT_PATHS]
    old = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("MLPE_KERNELS", None)  # every step on the default dispatch (auto)
    return env


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group, SIGKILL 5 s later if it is still there."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(argv: list[str], log_path: Path, limit_s: float, env: dict[str, str],
                cwd: Path = ROOT) -> dict:
    """Run argv with stdout+stderr into log_path (its first line: the command), at most
    limit_s seconds. {"rc", "seconds", "timed_out"}."""
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(limit_s, 0.1)), False
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc, timed_out = proc.wait(), True
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 2), "timed_out": timed_out}


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def last_json(path: Path) -> dict | None:
    """The last line of a file that is a JSON object (the benches end with one)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


@dataclasses.dataclass
class Context:
    run_dir: Path
    python: str
    dry_run: bool
    env: dict[str, str]


@dataclasses.dataclass
class Step:
    name: str
    title: str
    limit_s: float
    argv: Callable[[Context, float], list[str]]  # (context, deadline) -> command
    judge: Callable[[Context, dict], tuple[dict, str | None]]  # -> (figures, error or None)


def run_step(step: Step, ctx: Context, limit_s: float) -> dict:
    """One step: run, judge, and the record that goes into summary.json."""
    log = ctx.run_dir / f"{step.name}.log"
    deadline = time.time() + limit_s - 3.0  # the step's own work stops here; then it writes
    argv = step.argv(ctx, deadline)
    ran = run_command(argv, log, limit_s, ctx.env)
    try:
        figures, error = step.judge(ctx, ran)
    except Exception as err:  # noqa: BLE001 - a judge that breaks fails its step, not the run
        figures, error = {}, f"judging the output failed: {err!r}"
    if ran["timed_out"]:
        error = f"stopped after its limit of {limit_s:.0f} s" + (f"; {error}" if error else "")
    elif ran["rc"] and not error:
        error = f"exit status {ran['rc']}"
    status = "passed" if error is None else ("timeout" if ran["timed_out"] else "failed")
    record = {"name": step.name, "title": step.title, "status": status,
              "seconds": ran["seconds"], "limit_s": round(limit_s, 1), "command": argv,
              "exit_status": ran["rc"], "output": log.name, "figures": figures}
    if error is not None:
        record["error"] = error
        record["output_tail"] = tail(log)
    return record


def skipped(step: Step, why: str) -> dict:
    return {"name": step.name, "title": step.title, "status": "skipped", "seconds": 0.0,
            "limit_s": 0.0, "command": None, "exit_status": None, "output": None,
            "figures": {}, "error": why}


# -- a: the GPU tests -------------------------------------------------------------------------
def _has_module(ctx: Context, module: str) -> bool:
    done = subprocess.run([ctx.python, "-c", f"import {module}"], env=ctx.env, cwd=ROOT,
                          capture_output=True, check=False)
    return done.returncode == 0


def gpu_tests_argv(ctx: Context, deadline: float) -> list[str]:
    argv = [ctx.python, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider",
            "-rfEs", "--durations=15", f"--junitxml={ctx.run_dir / 'gpu_tests.xml'}"]
    if ctx.dry_run:
        return [*argv, "--collect-only"]
    if _has_module(ctx, "xdist"):  # Triton compiles on the CPU: workers side by side
        argv += ["-n", "6"]
    return argv


def junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    bad = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
           if case.find("failure") is not None or case.find("error") is not None]
    skips = sorted({(s.get("message") or "")[:120] for case in root.iter("testcase")
                    for s in case.findall("skipped")})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed_tests": bad[:30], "skip_reasons": skips[:10]}


def pytest_summary_line(text: str) -> str | None:
    """pytest's closing line ('3 passed, 1 skipped in 2.1s' / '172 tests collected')."""
    for line in reversed(text.splitlines()):
        if re.search(r"\b\d+ (passed|failed|error|errors|skipped|tests? collected)\b", line):
            return line.strip("= \n")
    return None


def gpu_tests_judge(ctx: Context, ran: dict) -> tuple[dict, str | None]:
    text = (ctx.run_dir / "gpu_tests.log").read_text(errors="replace")
    figures = {"summary_line": pytest_summary_line(text)}
    if ctx.dry_run:
        m = re.search(r"(\d+) tests? collected", text)
        figures["collected"] = int(m.group(1)) if m else 0
        return figures, None if m and not ran["rc"] else "collecting tests/gpu failed"
    xml = ctx.run_dir / "gpu_tests.xml"
    if xml.exists():
        figures.update(junit_counts(xml))
    if ran["rc"] == 0 and figures.get("skipped"):
        return figures, f"{figures['skipped']} GPU tests skipped on a GPU machine"
    if ran["rc"] == 5:
        return figures, "pytest collected no tests"
    if ran["rc"]:
        return figures, (f"{figures.get('failures', '?')} failed, "
                         f"{figures.get('errors', '?')} errors (exit status {ran['rc']})")
    return figures, None


# -- b: the kernel benchmark ------------------------------------------------------------------
BENCH_ARGS = ("--hidden", "8192", "--vocab", "131072", "--tokens", "8192")


def kernel_bench_argv(ctx: Context, deadline: float) -> list[str]:
    return [ctx.python, "-m", "mlpe.kernels.bench", *BENCH_ARGS,
            "--csv", str(ctx.run_dir / "kernel_bench.csv")]


def bench_rows(text: str) -> list[dict]:
    """The rows mlpe.kernels.bench prints ('  rmsnorm  mlpe  h=  8192  fwd ... full X ms')."""
    return [{"op": m.group(1), "impl": m.group(2), "hidden": m.group(3), "full_ms": m.group(4)}
            for m in re.finditer(r"^\s+(\S+)\s+(\S+)\s+h=\s*(\d+)\s.*?\bfull\s+([\d.]+) ms",
                                 text, re.M)]


def kernel_bench_judge(ctx: Context, ran: dict) -> tuple[dict, str | None]:
    import csv

    result = last_json(ctx.run_dir / "kernel_bench.log") or {}
    figures: dict = {"result": result}
    if ctx.dry_run:
        return figures, None if result.get("bench") == "kernels" else "no JSON line"
    path = ctx.run_dir / "kernel_bench.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    if not rows:  # stopped before the CSV: the rows it printed, one a measurement
        rows = bench_rows((ctx.run_dir / "kernel_bench.log").read_text(errors="replace"))
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        table.setdefault(f"{r['op']} h={r['hidden']}", {})[r["impl"]] = float(r["full_ms"])
    figures["full_ms"] = table  # forward + backward, per op and implementation
    figures["csv"] = path.name if path.exists() else None
    liger = {k: round(v["liger"] / v["mlpe"], 3) for k, v in table.items()
             if "liger" in v and v.get("mlpe")}
    figures["liger_ms_over_mlpe_ms"] = liger
    if ran["rc"]:
        return figures, None
    if not result.get("gpu"):
        return figures, "the bench saw no GPU"
    if not liger:
        return figures, "no Liger-Kernel rows: liger_kernel did not import in the bench"
    return figures, None


# -- c: the planner's calibration ------------------------------------------------------------
# (name, GPTConfig fields, micro-batch, mode): "autocast" trains as the worker does (fp32
# weights, bf16 autocast, FusedAdamW); "pure" has bf16 weights, the case
# mlpe.optimizer.memory.worker_activation_bytes models exactly. Hidden sizes repeat so
# Triton compiles few variants.
_125M = {"vocab": 50304, "seq_len": 1024, "layers": 12, "hidden": 768, "heads": 12,
         "kv_heads": 12, "ffn": 2048, "tied": True}
_30M = {"vocab": 32000, "seq_len": 512, "layers": 6, "hidden": 384, "heads": 6,
        "kv_heads": 6}
_200M = {"vocab": 32000, "seq_len": 1024, "layers": 12, "hidden": 1024, "heads": 16,
         "kv_heads": 4}
_500M = {"vocab": 32000, "seq_len": 1024, "layers": 8, "hidden": 2048, "heads": 16,
         "kv_heads": 8}
CALIBRATION = [
    ("gpt-30m b8", _30M, 8, "autocast"),
    ("gpt-30m b32", _30M, 32, "autocast"),
    ("gpt-125m b4", _125M, 4, "autocast"),
    ("gpt-125m b8", _125M, 8, "autocast"),
    ("gpt-125m b8 recompute", {**_125M, "recompute": "full"}, 8, "autocast"),
    ("200m gqa b4", _200M, 4, "autocast"),
    ("200m gqa b8 recompute", {**_200M, "recompute": "full"}, 8, "autocast"),
    ("500m b2", _500M, 2, "autocast"),
    ("500m s2048 b2", {**_500M, "seq_len": 2048}, 2, "autocast"),
    ("L24 h768 s2048 b2", {"vocab": 32000, "seq_len": 2048, "layers": 24, "hidden": 768,
                           "heads": 12, "kv_heads": 12}, 2, "autocast"),
    ("gpt-30m b8 pure", _30M, 8, "pure"),
    ("gpt-125m b8 pure", _125M, 8, "pure"),
    ("200m gqa b4 pure", _200M, 4, "pure"),
]
CALIBRATION_TINY = [
    ("tiny b2", {"vocab": 256, "seq_len": 32, "layers": 2, "hidden": 64, "heads": 4,
                 "kv_heads": 2}, 2, "autocast"),
    ("tiny b2 pure", {"vocab": 256, "seq_len": 32, "layers": 2, "hidden": 64, "heads": 4,
                      "kv_heads": 2, "recompute": "full"}, 2, "pure"),
]
MIN_CONFIGS = 10


def planner_gpu(name: str) -> str | None:
    """The planner's preset (mlpe.optimizer.hardware.GPUS) for a CUDA device name."""
    n = name.upper()
    if "H200" in n:
        return "h200"
    if "H100" in n:
        return "h100-sxm"
    if "A100" in n:
        return "a100-40gb" if "40GB" in n else "a100-80gb"
    return None


def error_pct(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return round(100.0 * (predicted - measured) / measured, 1)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def predict(cfg_fields: dict, batch: int, mode: str, gpu_preset: str | None) -> dict:
    """The planner's figures for one configuration, in bytes and seconds."""
    from mlpe.common.jobs import GPTConfig
    from mlpe.optimizer.hardware import Cluster, gpu
    from mlpe.optimizer.layout import Layout
    from mlpe.optimizer.memory import plan_memory, worker_activation_bytes, worker_state_bytes
    from mlpe.optimizer.models import worker_model
    from mlpe.optimizer.timing import plan_time

    cfg = GPTConfig(**cfg_fields)
    shape = worker_model(cfg)
    layout = Layout(micro_batch=batch, recompute=cfg.recompute)
    mem = plan_memory(shape, cfg.seq_len, "bf16", "adamw", layout)
    out = {"params": shape.params(),
           "planner_total_bytes": mem.total,  # with its reserve (CUDA context, fragmentation)
           "planner_allocated_bytes": mem.total - mem.reserve,
           "planner_breakdown_gib": {k: round(v, 3) for k, v in mem.gib().items()}}
    if mode == "pure":  # the exact mode: one dtype for the whole model, no autocast
        states = worker_state_bytes(cfg, 2)
        act = worker_activation_bytes(cfg, batch, cfg.seq_len, 2, cfg.recompute, fused=True)
        out["exact_forward_end_bytes"] = (states["params"] + states["optimizer"]
                                          + states["buffers"] + act)
        out["exact_all_bytes"] = out["exact_forward_end_bytes"] + states["grads"]
    if gpu_preset:
        t, _, mfu = plan_time(shape, Cluster(1, 1, gpu(gpu_preset)), cfg.seq_len,
                                         batch, "bf16", "adamw", layout)
        out.update(planner_step_s=t.total_s, planner_compute_s=t.compute_s,
                   planner_mfu=mfu, flops_per_step=shape.flops_per_token(cfg.seq_len)
                   * batch * cfg.seq_len)
    return out


def measure(cfg_fields: dict, batch: int, mode: str, device: str, warmup: int,
            steps: int) -> dict:
    """Train the worker's GPT as mlpe.worker.train does (one micro-batch a step: forward,
    backward, clip, FusedAdamW, zero_grad) and measure the steady steps."""
    import torch

    from mlpe.common.jobs import GPTConfig
    from mlpe.kernels.adamw import FusedAdamW
    from mlpe.worker.model import GPT

    cuda = device == "cuda"
    cfg = GPTConfig(**cfg_fields)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if mode == "pure":
        model = model.to(torch.bfloat16)
    model.train()
    opt = FusedAdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "autocast")
    x = torch.randint(0, cfg.vocab, (batch, cfg.seq_len), device=device)
    y = torch.randint(0, cfg.vocab, (batch, cfg.seq_len), device=device)
    times, losses = [], []
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())  # synchronises: the step is done
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_s": statistics.median(times), "step_s_all": [round(t, 5) for t in times],
           "loss_first": losses[0], "loss_last": losses[-1]}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        context = (total - free) - torch.cuda.memory_reserved()  # CUDA context, cuBLAS
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated() - base,
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                   context_bytes=context,
                   peak_device_bytes=torch.cuda.max_memory_reserved() + context)
    del model, opt, loss
    return out


def step_calibration(run_dir: Path, deadline: float, tiny: bool) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    preset = planner_gpu(name) or ("h100-sxm" if tiny else None)
    configs = CALIBRATION_TINY if tiny else CALIBRATION
    warmup, steps = (1, 2) if tiny else (2, 4)
    result = {"gpu": name, "planner_gpu": preset, "device": device, "rows": [],
              "configs": len(configs), "passed": False, "error": None}
    path = run_dir / "calibration.json"
    longest = 0.0
    for label, fields, batch, mode in configs:
        left = deadline - time.time()
        if left < max(6.0, 1.5 * longest):
            result["rows"].append({"config": label, "error": f"not run: {left:.0f} s left"})
            continue
        t0 = time.time()
        row: dict = {"config": label, "model": fields, "batch": batch, "mode": mode}
        try:
            row["predicted"] = predict(fields, batch, mode, preset)
            row["measured"] = measure(fields, batch, mode, device, warmup, steps)
        except Exception as err:  # noqa: BLE001 - one configuration's failure is a row
            row["error"] = f"{type(err).__name__}: {err}"
            if device == "cuda":
                torch.cuda.empty_cache()
        p, m = row.get("predicted", {}), row.get("measured", {})
        if "step_s" in m:
            row["error_pct"] = {
                "memory_planner_vs_allocated": error_pct(p.get("planner_allocated_bytes"),
                                                         m.get("peak_allocated_bytes")),
                "memory_planner_total_vs_device": error_pct(p.get("planner_total_bytes"),
                                                            m.get("peak_device_bytes")),
                "memory_exact_vs_allocated": error_pct(p.get("exact_forward_end_bytes"),
                                                       m.get("peak_allocated_bytes")),
                "step_time": error_pct(p.get("planner_step_s"), m["step_s"])}
            if p.get("flops_per_step") and device == "cuda":
                from mlpe.optimizer.hardware import gpu

                m["mfu"] = round(p["flops_per_step"] / m["step_s"]
                                 / (gpu(preset).bf16_tflops * 1e12), 4) if preset else None
        row["seconds"] = round(time.time() - t0, 2)
        longest = max(longest, row["seconds"])
        result["rows"].append(row)
        print(_calibration_line(row), flush=True)
        _write(path, result)
    done = [r for r in result["rows"] if "measured" in r]
    errs = {k: [r["error_pct"][k] for r in done if r["error_pct"].get(k) is not None]
            for k in ("memory_planner_vs_allocated", "memory_planner_total_vs_device",
                      "memory_exact_vs_allocated", "step_time")}
    result["abs_error_pct"] = {k: {"median": statistics.median(abs(e) for e in v),
                                   "max": max(abs(e) for e in v)} for k, v in errs.items() if v}
    need = len(configs) if tiny else MIN_CONFIGS
    result["measured"] = len(done)
    result["passed"] = len(done) >= need
    if not result["passed"]:
        result["error"] = f"{len(done)} of {len(configs)} configurations measured (need {need})"
    _write(path, result)
    print(json.dumps({k: result[k] for k in ("measured", "abs_error_pct", "error")}))
    return 0 if result["passed"] else 1


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


def _calibration_line(row: dict) -> str:
    if "error" in row:
        return f"  {row['config']:24s} ERROR {row['error']}"
    p, m, e = row["predicted"], row["measured"], row["error_pct"]
    mem = (f"peak {m['peak_allocated_bytes'] / GIB:6.2f} GiB, planner "
           f"{p['planner_allocated_bytes'] / GIB:6.2f} "
           f"({_pct(e['memory_planner_vs_allocated'])})"
           if "peak_allocated_bytes" in m else "peak n/a (CPU)")
    step = (f"step {m['step_s'] * 1e3:8.1f} ms, planner {p['planner_step_s'] * 1e3:7.1f} ms "
            f"({_pct(e['step_time'])})" if "planner_step_s" in p else
            f"step {m['step_s'] * 1e3:8.1f} ms")
    return f"  {row['config']:24s} {p['params'] / 1e6:7.1f}M  {mem}  {step}"


# -- d: the agent's NVML cost ------------------------------------------------------------------
NVML_HZ = 100.0
FLUSH_TICKS = 10  # the agent's default: a flush (utilization read) every 100 ms at 100 Hz


def _stats_us(samples_ns: list[int]) -> dict:
    if not samples_ns:
        return {}
    us = sorted(s / 1e3 for s in samples_ns)
    return {"n": len(us), "mean": round(statistics.fmean(us), 1),
            "p50": round(us[len(us) // 2], 1),
            "p99": round(us[min(len(us) - 1, int(0.99 * len(us)))], 1),
            "max": round(us[-1], 1)}


def step_nvml(run_dir: Path, deadline: float, tiny: bool) -> int:
    from mlpe.agent.sources.nvml import NvmlGpus, nvml_available

    path = run_dir / "nvml.json"
    if not nvml_available():
        result = {"passed": tiny, "error": None if tiny else
                  "NVML not available (pynvml missing, or no driver/GPU)", "nvml": False}
        _write(path, result)
        print("nvml: not available here" + (" (dry run: nothing to measure)" if tiny else ""))
        return 0 if tiny else 1
    t0 = time.perf_counter()
    gpus = NvmlGpus(hz=NVML_HZ)
    setup_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        inventory = gpus.inventory()
        inventory_s = time.perf_counter() - t0
        for k in range(20):  # warm-up: first-use discovery of unsupported queries
            gpus.read(k, time.time_ns())
        seconds = max(1.0, min(5.0, deadline - time.time() - 3.0))
        kinds: dict[str, dict[str, list[int]]] = {}
        util_cpu, util_wall = [], []
        period = 1.0 / NVML_HZ
        start = time.monotonic()
        ticks = int(seconds * NVML_HZ)
        for k in range(ticks):  # paced as the agent paces them
            delay = start + k * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            kind = ("energy" if k % round(NVML_HZ) == 0 else "counters"
                    if k % round(NVML_HZ / 10) == 0 else "plain")
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            gpus.read(k, time.time_ns())
            c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
            kinds.setdefault(kind, {"cpu": [], "wall": []})
            kinds[kind]["cpu"].append(c1 - c0)
            kinds[kind]["wall"].append(w1 - w0)
            if (k + 1) % FLUSH_TICKS == 0:
                c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
                gpus.read_utilization()
                util_cpu.append(time.thread_time_ns() - c0)
                util_wall.append(time.perf_counter_ns() - w0)
        back_to_back = []
        for k in range(300):
            c0 = time.thread_time_ns()
            gpus.read(k + 1, time.time_ns())  # k + 1: no energy reads, as most ticks
            back_to_back.append(time.thread_time_ns() - c0)
    finally:
        gpus.close()
    all_cpu = [x for v in kinds.values() for x in v["cpu"]]
    mean_cpu_us = statistics.fmean(all_cpu) / 1e3 + statistics.fmean(util_cpu or [0]) / 1e3 / \
        FLUSH_TICKS
    result = {
        "passed": True, "error": None, "nvml": True, "gpus": gpus.n,
        "names": sorted({g.name for g in inventory}), "hz": NVML_HZ, "ticks": ticks,
        "setup_ms": round(setup_s * 1e3, 2), "inventory_ms": round(inventory_s * 1e3, 2),
        "unsupported": sorted(gpus.unsupported),
        "cpu_us_per_tick": round(mean_cpu_us, 1),  # all GPUs, utilization read amortised
        "cpu_us_per_tick_per_gpu": round(mean_cpu_us / max(gpus.n, 1), 1),
        "cpu_pct_of_core_at_100hz": round(mean_cpu_us * NVML_HZ / 1e4, 3),
        "by_tick_kind": {k: {"cpu_us": _stats_us(v["cpu"]), "wall_us": _stats_us(v["wall"])}
                         for k, v in kinds.items()},
        "utilization_read": {"cpu_us": _stats_us(util_cpu), "wall_us": _stats_us(util_wall)},
        "back_to_back_cpu_us": _stats_us(back_to_back),
    }
    _write(path, result)
    print(f"nvml: {gpus.n} GPU(s), {ticks} ticks at {NVML_HZ:g} Hz: "
          f"{result['cpu_us_per_tick']} us CPU a tick "
          f"({result['cpu_pct_of_core_at_100hz']}% of a core)")
    print(json.dumps({k: result[k] for k in ("cpu_us_per_tick", "by_tick_kind")}))
    return 0


# -- e: FSDP2 + a Hugging Face Llama, with and without mlpe.kernels ----------------------------
LLAMA = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
         "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 4,
         "max_position_embeddings": 2048}
LLAMA_TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fully_shard():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4-2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def llama_run(patched: bool, device: str, tiny: bool, batch: int, seq: int, warmup: int,
              steps: int) -> dict:
    """Build the Llama, (patch it,) shard it with FSDP2, train: steps/s, peak memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fully_shard, MixedPrecisionPolicy = _fully_shard()
    cuda = device == "cuda"
    config = LlamaConfig(**(LLAMA_TINY if tiny else LLAMA), rms_norm_eps=1e-5,
                         tie_word_embeddings=False, use_cache=False)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    out: dict = {"variant": "patched" if patched else "unpatched",
                 "params": sum(p.numel() for p in model.parameters())}
    if patched:
        from mlpe.kernels.hf import apply_mlpe_kernels

        out["applied"] = apply_mlpe_kernels(model)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    torch.manual_seed(1)
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    times, losses = [], []
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    out.update(step_ms=round(step_s * 1e3, 2), steps_per_s=round(1 / step_s, 3),
               tokens_per_s=round(batch * seq / step_s), loss_first=losses[0],
               loss_last=losses[-1], losses=[round(v, 4) for v in losses])
    if cuda:
        out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3))
    del model, opt, loss
    return out


def step_fsdp_llama(run_dir: Path, deadline: float, tiny: bool) -> int:
    import torch
    import torch.distributed as dist

    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    batch, seq = (2, 32) if tiny else (4, 2048)
    warmup, steps = (1, 2) if tiny else (3, 10)
    result: dict = {"model": {**(LLAMA_TINY if tiny else LLAMA), "batch": batch, "seq": seq,
                              "compute_dtype": "bfloat16 (FSDP2 MixedPrecisionPolicy; "
                              "fp32 sharded parameters)"},
                    "device": device, "variants": [], "passed": False, "error": None}
    path = run_dir / "fsdp_llama.json"
    try:
        from mlpe.kernels.hf import apply_mlpe_kernels  # noqa: F401 - importable?
        hf_error = None
    except Exception as err:  # noqa: BLE001 - any reason it does not import is the finding
        hf_error = f"mlpe.kernels.hf is not importable: {type(err).__name__}: {err}"
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    errors = [hf_error] if hf_error else []
    try:
        for patched in (False, True):
            if patched and hf_error:
                continue
            left, last = deadline - time.time(), result["variants"][-1:]
            need = 1.5 * last[0]["seconds"] if last else 10.0
            if left < need:
                errors.append(f"{'patched' if patched else 'unpatched'} not run: "
                              f"{left:.0f} s left")
                continue
            t0 = time.time()
            try:
                run = llama_run(patched, device, tiny, batch, seq, warmup, steps)
            except Exception as err:  # noqa: BLE001 - recorded; the other variant still runs
                run = {"variant": "patched" if patched else "unpatched",
                       "error": f"{type(err).__name__}: {err}"}
                errors.append(f"{run['variant']}: {run['error']}")
            run["seconds"] = round(time.time() - t0, 2)
            result["variants"].append(run)
            print(json.dumps(run), flush=True)
            _write(path, result)
    finally:
        dist.destroy_process_group()
    by = {v["variant"]: v for v in result["variants"] if "error" not in v}
    if "patched" in by and "unpatched" in by:
        p, u = by["patched"], by["unpatched"]
        result["speedup_steps_per_s"] = round(p["steps_per_s"] / u["steps_per_s"], 3)
        if "peak_allocated_gib" in p:
            result["peak_memory_ratio"] = round(p["peak_allocated_gib"]
                                                / u["peak_allocated_gib"], 3)
        result["first_loss_difference"] = round(abs(p["loss_first"] - u["loss_first"]), 4)
    result["passed"] = not errors and len(by) == 2
    result["error"] = "; ".join(errors) or (None if result["passed"] else "no result")
    _write(path, result)
    print(json.dumps({k: result.get(k) for k in ("speedup_steps_per_s", "peak_memory_ratio",
                                                 "first_loss_difference", "error")}))
    return 0 if result["passed"] else 1


# -- the internal steps, as commands ----------------------------------------------------------
INTERNAL = {"calibration": step_calibration, "nvml": step_nvml, "fsdp_llama": step_fsdp_llama}


def internal_argv(name: str) -> Callable[[Context, float], list[str]]:
    def argv(ctx: Context, deadline: float) -> list[str]:
        return [ctx.python, str(THIS), "--step", name, "--run-dir", str(ctx.run_dir),
                "--deadline", f"{deadline:.1f}", *(["--tiny"] if ctx.dry_run else [])]
    return argv


def internal_judge(name: str) -> Callable[[Context, dict], tuple[dict, str | None]]:
    def judge(ctx: Context, ran: dict) -> tuple[dict, str | None]:
        path = ctx.run_dir / f"{name}.json"
        if not path.exists():
            return {}, f"wrote no {path.name}"
        figures = json.loads(path.read_text())
        error = figures.pop("error", None)
        passed = figures.pop("passed", False)
        return figures, error if error or passed else "did not pass"
    return judge


STEPS = [
    Step("gpu_tests", "pytest tests/gpu", 95, gpu_tests_argv, gpu_tests_judge),
    Step("kernel_bench", "mlpe bench kernels vs eager, torch.compile, Liger-Kernel", 75,
         kernel_bench_argv, kernel_bench_judge),
    Step("calibration", "planner memory/step-time predictions vs the worker's GPT", 80,
         internal_argv("calibration"), internal_judge("calibration")),
    Step("nvml", "the agent's NVML CPU cost per tick", 15, internal_argv("nvml"),
         internal_judge("nvml")),
    Step("fsdp_llama", "FSDP2 + HF Llama, apply_mlpe_kernels vs unpatched", 70,
         internal_argv("fsdp_llama"), internal_judge("fsdp_llama")),
]
SETUP_LIMIT_S = 25.0


# -- the whole run ----------------------------------------------------------------------------
# What the steps import: {label: (module, distribution)}.
PROBE_MODULES = {"transformers": ("transformers", "transformers"),
                 "liger_kernel": ("liger_kernel.transformers.functional", "liger-kernel"),
                 "pytest": ("pytest", "pytest"), "xdist": ("xdist", "pytest-xdist"),
                 "pynvml": ("pynvml", "nvidia-ml-py"), "protobuf": ("google.protobuf",
                                                                   "protobuf"),
                 "numpy": ("numpy", "numpy"), "yaml": ("yaml", "pyyaml"),
                 "huggingface_hub": ("huggingface_hub", "huggingface-hub"),
                 "mlpe.kernels.hf": ("mlpe.kernels.hf", None)}


def step_probe(modules: bool) -> int:
    """Print one JSON line: torch, CUDA, the GPUs; with modules, what each step imports."""
    import importlib

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    try:
        import torch
    except Exception as err:  # noqa: BLE001 - no torch at all is an answer too
        info["torch_error"] = f"{type(err).__name__}: {err}"
        print(json.dumps(info))
        return 0
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available())
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001
        info["triton"] = f"not importable: {err}"
    if info["cuda_available"]:
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpus"] = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "capability": f"{props.major}."
                                 f"{props.minor}", "memory_gib": round(props.total_memory
                                                                       / GIB, 1)})
    if modules:
        from importlib import metadata

        info["modules"] = {}
        for label, (module, dist) in PROBE_MODULES.items():
            try:
                mod = importlib.import_module(module)
                version = None
                with contextlib.suppress(metadata.PackageNotFoundError):
                    version = metadata.version(dist) if dist else "importable"
                info["modules"][label] = {"version": version,
                                          "file": getattr(mod, "__file__", None)}
            except Exception as err:  # noqa: BLE001 - what is missing is the finding
                info["modules"][label] = {"error": f"{type(err).__name__}: {err}"}
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - the driver version is a nicety
            pass
    print(json.dumps(info))
    return 0


def probe(python: str, env: dict[str, str], modules: bool, timeout: float = 60) -> dict:
    argv = [python, str(THIS), "--step", "probe"] + (["--modules"] if modules else [])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"probe_error": f"the probe took more than {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"probe_error": f"exit {done.returncode}: {done.stderr[-1000:]}"}


def git_state() -> dict | None:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "changed_files": len(dirty.stdout.splitlines())}


def write_summary(run_dir: Path, summary: dict) -> None:
    _write(run_dir / "summary.json", summary)


def print_table(summary: dict) -> None:
    print(f"gpu-check: {summary['gpu']['name'] if summary.get('gpu') else 'no GPU'}, "
          f"{summary['wall_s']:.0f} s")
    for s in [summary["setup"], *summary["steps"]]:
        extra = f"  {s['error'][:150]}" if s.get("error") else ""
        print(f"  {s['name']:13s} {s['status']:8s} {s['seconds']:7.1f} s{extra}")
    print(f"gpu-check: {'all passed' if summary['passed'] else 'NOT all passed'}; "
          f"results in {summary['results']}")


def choose_steps(only: str | None) -> list[Step]:
    if not only:
        return list(STEPS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in STEPS})
    if unknown:
        raise SystemExit(f"gpu-check: --only {only!r}: unknown step(s) {', '.join(unknown)} "
                         f"(steps: {', '.join(s.name for s in STEPS)})")
    return [s for s in STEPS if s.name in names]


def limits(steps: list[Step], budget_s: float) -> dict[str, float]:
    """Each step's limit: its own, scaled down so that they add up to the budget."""
    total = SETUP_LIMIT_S + sum(s.limit_s for s in steps)
    scale = min(1.0, budget_s / total) if total else 1.0
    return {"setup": SETUP_LIMIT_S * scale, **{s.name: s.limit_s * scale for s in steps}}


def run_all(args: argparse.Namespace, argv: list[str]) -> int:
    started, t0 = utc_now(), time.monotonic()
    deadline = t0 + args.budget_s
    python = sys.executable
    first = probe(python, step_env(None), modules=False)
    if not args.dry_run and not first.get("cuda_available"):
        if "torch_error" in first or "probe_error" in first:
            why = first.get("torch_error") or first.get("probe_error")
            if Path("/dev/nvidia0").exists():
                print(f"gpu-check: this machine has an NVIDIA device but torch does not work "
                      f"here: {why}", file=sys.stderr)
                return 1
            print(f"gpu-check: no CUDA GPU here (torch is not importable: {why}); nothing to "
                  "check")
            return 0
        print(NO_GPU)
        return 0
    steps = choose_steps(args.only)
    gpu_name = first["gpus"][0]["name"] if first.get("gpus") else "cpu-dry-run"
    base = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="mlpe-gpu-check-")) if args.dry_run else RESULTS)
    run_dir = base / run_dir_name(gpu_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: {gpu_name}; results in {run_dir}", flush=True)
    limit = limits(steps, args.budget_s)
    summary: dict = {
        "check": "mlpe gpu-check", "command": shlex.join([python, *argv]),
        "cwd": os.getcwd(), "started_utc": started, "finished_utc": None, "finished": False,
        "dry_run": args.dry_run, "budget_s": args.budget_s, "results": str(run_dir),
        "python": first.get("python"), "python_executable": python,
        "gpu": ({**first["gpus"][0], "count": len(first["gpus"])} if first.get("gpus")
                else None),
        "versions": {"torch": first.get("torch"), "cuda": first.get("cuda"),
                     "triton": first.get("triton"), "cudnn": first.get("cudnn")},
        "git": git_state(), "setup": None, "steps": [], "passed": False, "wall_s": 0.0}

    # Setup: the wheels the machine lacks, then what each step will import.
    s0 = time.monotonic()
    setup = setup_site(Path(args.wheels), install_all=args.install_all)
    site = Path(setup["site"]) if setup.get("site") else None
    env = step_env(site)
    second = probe(python, env, modules=True, timeout=max(10.0, limit["setup"]))
    summary["versions"].update({k: v.get("version") for k, v in
                                second.get("modules", {}).items()})
    if second.get("driver") and summary["gpu"]:
        summary["gpu"]["driver"] = second["driver"]
    setup_record = {"name": "setup", "title": "wheels from .gpu-wheels, imports",
                    "status": "passed" if "error" not in setup else "failed",
                    "seconds": round(time.monotonic() - s0, 2),
                    "limit_s": round(limit["setup"], 1), "output": "setup.json",
                    "figures": {**setup, "modules": second.get("modules")}}
    if "error" in setup:
        setup_record["error"] = setup["error"]
    _write(run_dir / "setup.json", setup_record["figures"])
    summary["setup"] = setup_record
    print(f"gpu-check: setup {setup_record['status']} in {setup_record['seconds']:.1f} s"
          + (f": {setup['error']}" if "error" in setup else ""), flush=True)
    write_summary(run_dir, summary)

    ctx = Context(run_dir, python, args.dry_run, env)
    for i, step in enumerate(steps, 1):
        left = deadline - time.monotonic()
        if left < 10:
            record = skipped(step, f"the budget of {args.budget_s:.0f} s was spent")
        else:
            print(f"gpu-check: [{i}/{len(steps)}] {step.name} (at most "
                  f"{min(limit[step.name], left):.0f} s) ...", flush=True)
            record = run_step(step, ctx, min(limit[step.name], left))
        summary["steps"].append(record)
        print(f"gpu-check: {step.name} {record['status']} in {record['seconds']:.1f} s"
              + (f": {record['error'][:300]}" if record.get("error") else ""), flush=True)
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        write_summary(run_dir, summary)
    summary["passed"] = (summary["setup"]["status"] == "passed"
                         and all(s["status"] == "passed" for s in summary["steps"]))
    summary.update(finished=True, finished_utc=utc_now(),
                   wall_s=round(time.monotonic() - t0, 1),
                   exit_status=0 if summary["passed"] else 1)
    write_summary(run_dir, summary)
    print_table(summary)
    return summary["exit_status"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python tests/gpu/check.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"results go to DIR/<UTC time>-<GPU>/ (default "
                   f"{RESULTS.relative_to(ROOT)}; a temporary folder with --dry-run)")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="seconds for the whole run; the steps' limits add up to it (360)")
    p.add_argument("--only", default=None, metavar="STEPS",
                   help=f"comma-separated steps ({','.join(s.name for s in STEPS)})")
    p.add_argument("--dry-run", action="store_true",
                   help="run every step's code path without a GPU (CPU, tiny sizes)")
    p.add_argument("--wheels", default=str(WHEELS), metavar="DIR",
                   help="the carried wheels (.gpu-wheels)")
    p.add_argument("--install-all", action="store_true",
                   help="install every carried wheel, even those the machine has (testing)")
    p.add_argument("--download-wheels", action="store_true",
                   help="`make gpu-wheels`: download the wheels into --wheels (needs uv and "
                   "a registry)")
    p.add_argument("--uv", default=str(Path.home() / ".cache/mlpe/uv-0.13.8/bin/uv"),
                   help="uv, for --download-wheels")
    p.add_argument("--pythons", default=" ".join(PYTHONS),
                   help="Python versions to download wheels for (3.10 3.11 3.12)")
    # Internal: one step in this process (the parent runs each step this way).
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--modules", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.download_wheels:
        return download_wheels(Path(args.uv), Path(args.wheels),
                               tuple(args.pythons.replace(",", " ").split()))
    if args.step == "probe":
        return step_probe(args.modules)
    if args.step:
        if args.step not in INTERNAL:
            p.error(f"--step {args.step!r}: expected one of {', '.join(INTERNAL)}")
        deadline = args.deadline or time.time() + 300
        return INTERNAL[args.step](Path(args.run_dir), deadline, args.tiny)
    return run_all(args, argv)


if __name__ == "__main__":
    sys.exit(main())
