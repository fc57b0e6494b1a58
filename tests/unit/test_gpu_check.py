"""tests/gpu/check.py (`make gpu-check`) without a GPU: the one-line answer, the wheel
selection and install, the step bookkeeping and summary.json, the planner predictions of
every calibration configuration, and the NVML step on a fake driver."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu" / "check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("mlpe_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_without_a_gpu_it_says_so_and_exits_0(check):
    before = sorted(check.RESULTS.iterdir()) if check.RESULTS.exists() else []
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a GPU machine
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [check.NO_GPU]
    after = sorted(check.RESULTS.iterdir()) if check.RESULTS.exists() else []
    assert after == before  # nothing written


@pytest.mark.parametrize(("name", "python", "fits"), [
    ("transformers-5.17.0-py3-none-any.whl", (3, 10), True),
    ("shellingham-1.5.4-py2.py3-none-any.whl", (3, 12), True),
    ("protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl", (3, 12), True),
    ("protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl", (3, 9), False),
    ("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", (3, 11), True),
    ("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", (3, 12), False),
    ("regex-2026.9.29-cp310-cp310-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", (3, 10),
     True),
    ("numpy-2.4.6-cp312-cp312-macosx_14_0_arm64.whl", (3, 12), False),
    ("numpy-2.4.6-cp312-cp312-manylinux_2_28_aarch64.whl", (3, 12), False),
])
def test_wheel_tags(check, name, python, fits):
    wheel = check.Wheel.parse(Path(name))
    assert wheel is not None and wheel.fits(python) is fits


def test_carried_leaves_torch_and_the_command_line_packages_behind(check):
    pins = {"torch": "2.15.0", "triton": "3.9.0", "nvidia-cublas": "13.4", "cuda-bindings": "13",
            "nvidia-ml-py": "13.615.71", "transformers": "5.17.0", "numpy": "2.4.6",
            "typer": "0.29.2", "hf-xet": "1.8.0", "filelock": "4.2", "Liger_Kernel": "0.8.5"}
    assert check.carried(pins, "3.11") == {"nvidia-ml-py": "13.615.71",
                                           "transformers": "5.17.0", "numpy": "2.4.6",
                                           "liger-kernel": "0.8.5"}
    assert "numpy" not in check.carried(pins, "3.10")
    assert check.parse_pins("a-b==1.0\n    # via x\nC_d==2.0 ; python_version < '4'\n") == {
        "a-b": "1.0", "c-d": "2.0"}


def test_install_plan_keeps_what_the_machine_has_unless_pinned_or_older(check):
    pins = {"transformers": "5.17.0", "numpy": "2.4.6", "tqdm": "4.70.1", "regex": "2026.1",
            "pytest": "9.2.0"}
    have = {"transformers": "4.57.0", "numpy": "1.26.4", "tqdm": "4.71.0", "regex": "2025.1"}
    install, keep = check.plan_install(pins, have)
    assert [r["name"] for r in install] == ["pytest", "regex", "transformers"]
    assert [r["name"] for r in keep] == ["numpy", "tqdm"]
    assert check.version_key("2026.10.19.post1") == (2026, 10, 19)


def _fake_wheel(folder: Path, name: str, version: str, with_data: bool = False) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"__version__ = {version!r}\n")
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        if with_data:
            z.writestr(f"{name}-{version}.data/purelib/{name}_extra.py", "X = 1\n")
    return path


def test_setup_installs_missing_wheels_once_and_reuses_them(check, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "gpucheckfake", "1.0", with_data=True)
    _fake_wheel(wheels, "gpucheckother", "2.0")
    monkeypatch.setattr(check, "_pip_command", lambda python, wheel_dir: None)  # unzip path
    target = tmp_path / "site"
    first = check.setup_site(wheels, target)
    assert "error" not in first and first["reused"] is False
    assert {r["name"] for r in first["installed"]} == {"gpucheckfake", "gpucheckother"}
    assert (target / "gpucheckfake" / "__init__.py").exists()
    assert (target / "gpucheckfake_extra.py").exists()  # .data/purelib moved up
    assert not list(target.glob("*.data"))
    again = check.setup_site(wheels, target)
    assert again["reused"] is True
    assert check.setup_site(tmp_path / "none", target)["error"].startswith("no wheels")


def _step(check, name, code):
    return check.Step(name, name, 30, lambda ctx, deadline: [sys.executable, "-c", code],
                      lambda ctx, ran: ({"rc": ran["rc"]}, None))


def test_a_failing_or_hanging_step_is_recorded_and_stopped(check, tmp_path):
    ctx = check.Context(tmp_path, sys.executable, False, dict(os.environ))
    ok = check.run_step(_step(check, "ok", "print('hello')"), ctx, 30)
    assert ok["status"] == "passed" and "error" not in ok and ok["figures"] == {"rc": 0}
    assert (tmp_path / "ok.log").read_text().splitlines()[-1] == "hello"
    bad = check.run_step(_step(check, "bad", "import sys; print('boom'); sys.exit(3)"), ctx, 30)
    assert bad["status"] == "failed" and bad["error"] == "exit status 3"
    assert bad["output_tail"].endswith("boom") and bad["output"] == "bad.log"
    t0 = time.monotonic()
    slow = check.run_step(_step(check, "slow", "import time; time.sleep(60)"), ctx, 1)
    assert slow["status"] == "timeout" and "limit of 1 s" in slow["error"]
    assert time.monotonic() - t0 < 15


def test_the_run_goes_on_after_a_failure_and_writes_the_summary(check, tmp_path, monkeypatch):
    gpu = {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.2}
    monkeypatch.setattr(check, "probe", lambda python, env, modules, timeout=60: {
        "cuda_available": True, "gpus": [gpu], "torch": "2.x", "cuda": "13.0",
        "triton": "3.x", "python": "3.11", "modules": {"pytest": {"version": "9.2.0"}}})
    monkeypatch.setattr(check, "setup_site", lambda wheel_dir, install_all=False: {
        "site": None, "installed": [], "kept": []})
    monkeypatch.setattr(check, "STEPS", [
        _step(check, "first", "print(1)"), _step(check, "second", "raise SystemExit(2)"),
        _step(check, "third", "print(3)")])
    assert check.main(["--out", str(tmp_path)]) == 1
    run_dir, = tmp_path.iterdir()
    assert run_dir.name.endswith("Z-nvidia-h100-80gb-hbm3")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("first", "passed"), ("second", "failed"), ("third", "passed")]
    assert summary["passed"] is False and summary["exit_status"] == 1 and summary["finished"]
    assert summary["gpu"]["name"] == gpu["name"] and summary["gpu"]["count"] == 1
    assert summary["versions"]["pytest"] == "9.2.0" and "--out" in summary["command"]
    assert all((run_dir / s["output"]).exists() for s in summary["steps"])
    assert sum(s["limit_s"] for s in summary["steps"]) + summary["setup"]["limit_s"] <= 360.1

    monkeypatch.setattr(check, "STEPS", [_step(check, "first", "print(1)")])
    assert check.main(["--out", str(tmp_path / "ok")]) == 0
    with pytest.raises(SystemExit, match="unknown step"):
        check.main(["--out", str(tmp_path), "--only", "nope"])


def test_limits_add_up_to_the_budget(check):
    assert sum(check.limits(check.STEPS, 360).values()) == pytest.approx(360, abs=0.5)
    assert sum(check.limits(check.STEPS, 180).values()) == pytest.approx(180)
    assert [s.name for s in check.STEPS] == ["gpu_tests", "kernel_bench", "calibration",
                                             "nvml", "fsdp_llama"]


def test_output_parsers(check, tmp_path):
    assert check.pytest_summary_line("..\n=== 3 passed, 1 skipped in 2.10s ===\n") == \
        "3 passed, 1 skipped in 2.10s"
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" '
                   'time="1.5"><testcase classname="a" name="t1"/><testcase classname="a" '
                   'name="t2"><failure/></testcase><testcase classname="a" name="t3">'
                   '<skipped message="no CUDA GPU here"/></testcase></testsuite></testsuites>')
    counts = check.junit_counts(xml)
    assert (counts["passed"], counts["failed_tests"], counts["skip_reasons"]) == (
        1, ["a::t2"], ["no CUDA GPU here"])
    text = ("  rmsnorm           mlpe     h=  8192  fwd  0.0500 ms    2000 GB/s (66%)  bwd  "
            "0.1000 ms     900 GB/s  full  0.1500 ms  x1.20 vs compile\n")
    assert check.bench_rows(text) == [{"op": "rmsnorm", "impl": "mlpe", "hidden": "8192",
                                       "full_ms": "0.1500"}]
    assert check.planner_gpu("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert check.planner_gpu("NVIDIA H200") == "h200"
    assert check.planner_gpu("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert check.planner_gpu("Tesla T4") is None


def test_every_calibration_configuration_has_planner_predictions(check):
    assert len(check.CALIBRATION) >= check.MIN_CONFIGS
    for label, fields, batch, mode in check.CALIBRATION:
        p = check.predict(fields, batch, mode, "h100-sxm")
        assert p["planner_allocated_bytes"] > 0 and p["planner_step_s"] > 0, label
        assert ("exact_forward_end_bytes" in p) is (mode == "pure"), label
    assert check.error_pct(110, 100) == 10.0 and check.error_pct(1, None) is None


class _FakeNvml:
    """One GPU that answers every query the NVML source makes."""

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(f"NVML error {value}")
            self.value = value

    NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_GPU_IS_LOST = 0, 3, 15
    NVML_NVLINK_MAX_LINKS, NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM = 2, 0, 1, 2
    nvmlEventTypeXidCriticalError = 8

    def __init__(self):
        self.fields: dict[str, int] = {}

    def __getattr__(self, name):
        if name.startswith("NVML_FI_"):  # field ids: distinct numbers
            return self.fields.setdefault(name, 100 + len(self.fields))
        raise AttributeError(name)

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetUUID(self, h): return f"GPU-fake-{h}"
    def nvmlDeviceGetName(self, h): return "Fake GPU"
    def nvmlDeviceGetMaxClockInfo(self, h, kind): return 1980
    def nvmlDeviceGetClockInfo(self, h, kind): return 1500
    def nvmlDeviceGetTemperature(self, h, kind): return 40
    def nvmlDeviceGetEnforcedPowerLimit(self, h): return 700_000
    def nvmlDeviceGetCurrentClocksEventReasons(self, h): return 0
    def nvmlDeviceGetComputeRunningProcesses(self, h): return []
    def nvmlDeviceGetPciInfo(self, h): return SimpleNamespace(busId="00000000:01:00.0")
    def nvmlDeviceGetMemoryInfo(self, h): return SimpleNamespace(used=1 << 30, total=80 << 30)
    def nvmlDeviceGetUtilizationRates(self, h): return SimpleNamespace(gpu=50, memory=20)

    def nvmlDeviceGetNvLinkState(self, h, link):
        raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)

    def nvmlEventSetCreate(self):
        raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetFieldValues(self, h, ids):
        return [SimpleNamespace(nvmlReturn=0, valueType=1, value=SimpleNamespace(uiVal=100))
                for _ in ids]


def test_nvml_step_measures_the_cost_of_a_tick(check, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    assert check.step_nvml(tmp_path, time.time() + 4.5, tiny=False) == 0
    result = json.loads((tmp_path / "nvml.json").read_text())
    assert result["passed"] and result["gpus"] == 1 and result["ticks"] >= 100
    assert result["cpu_us_per_tick"] > 0
    assert set(result["by_tick_kind"]) == {"plain", "counters", "energy"}
