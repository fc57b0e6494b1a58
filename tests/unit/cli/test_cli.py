"""The CLI as a person runs it: help, version, clear errors and exit codes."""

from tests.helpers import mlpe as run_mlpe
from tests.helpers import mlpe_env


def mlpe(*args, env=None):
    return run_mlpe(*args, env=mlpe_env(**(env or {})), timeout=60)


def test_help_lists_commands():
    out = mlpe("--help")
    assert out.returncode == 0
    assert "stack" in out.stdout and "version" in out.stdout


def test_version():
    out = mlpe("version")
    assert out.returncode == 0
    assert out.stdout.startswith("mlpe ") and "kafka 4." in out.stdout


def test_bad_setting_is_one_clear_line_and_exit_2():
    out = mlpe("stack", "status", env={"MLPE_REDIS_PORT": "six"})
    assert out.returncode == 2
    assert out.stderr.strip() == ("mlpe: configuration error: MLPE_REDIS_PORT='six': "
                                  "expected a TCP port, an integer from 1 to 65535")
    assert "Traceback" not in out.stderr


def test_status_down_is_a_table_not_a_traceback(tmp_path):
    env = {"MLPE_STATE_DIR": str(tmp_path), "MLPE_KAFKA_PORT": "1",
           "MLPE_INFLUX_PORT": "3", "MLPE_REDIS_PORT": "5"}
    out = mlpe("stack", "status", env=env)
    assert out.returncode == 3
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["COMPONENT", "STATE", "VERSION", "ADDRESS"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["kafka", "down"], ["influxdb", "down"], ["redis", "down"]]
    assert "Traceback" not in out.stderr


def test_unknown_action_is_refused_by_argparse():
    out = mlpe("stack", "explode")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


def test_run_refuses_out_of_range_arguments_before_starting_anything(tmp_path):
    env = {"MLPE_STATE_DIR": str(tmp_path)}
    for args, message in ((("--steps", "50"), "argument --steps: 50 is outside 100..100000"),
                          (("--duration", "soon"), "argument --duration: 'soon' is not a float"),
                          (("--duration", "5"), "argument --duration: 5 is outside 20..3600")):
        out = mlpe("run", *args, env=env)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())  # no stack started, no state written


def test_bench_kernels_is_the_kernel_packages_own_parser():
    out = mlpe("bench", "kernels", "--hidden", "4k")
    assert out.returncode == 1 and "--hidden '4k'" in out.stderr


def test_plan_layout_from_the_shell():
    args = ("plan", "--model", "llama3-70b", "--cluster", "16x8xH100", "--global-batch",
            "1024", "--seq", "8192", "--layout")
    fits = mlpe(*args, "tp8,pp4,zero1,mb1,recompute=selective")
    assert fits.returncode == 0, fits.stderr
    assert "Layout dp4 tp8 pp4 mb1x256 zero1 sp recompute=selective" in fits.stdout
    assert "Memory per GPU:" in fits.stdout and "Step time" in fits.stdout
    assert "= compute" in fits.stdout and "pipeline bubble" in fits.stdout
    over = mlpe(*args, "dp128")
    assert over.returncode == 3 and "(CANNOT RUN)" in over.stdout
    assert "out of memory by" in over.stdout and "Nearest layouts that run:" in over.stdout
    bad = mlpe(*args, "tp8,pp=four")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "mlpe plan: layout: part 'pp=four' is not understood: " \
        "expected " + "comma-separated parts like tp8,pp16,dp128,vpp2,cp2,ep4,zero1 (or " \
        "fsdp),mb1,ga16,sp,recompute=selective,offload=optimizer"


def test_plan_cheapest_and_its_costs_from_the_shell(tmp_path):
    args = ("plan", "--model", "llama3-8b", "--cluster", "4x8xH100", "--global-batch", "256",
            "--seq", "8192", "--top", "3")
    cheap = mlpe(*args, "--objective", "cheapest", "--pricing", "spot")
    assert cheap.returncode == 0, cheap.stderr
    header, *rows = cheap.stdout.splitlines()[:4]
    assert header.startswith(" #  GPUS") and header.endswith("USD/STEP  USD/1B TOK")
    per_billion = [float(row.split()[-1].replace(",", "")) for row in rows]
    assert per_billion == sorted(per_billion) and per_billion[0] > 0
    prices = tmp_path / "prices.yaml"
    prices.write_text("currency: EUR\nsource: x\ndate: 2026-01-01\ngpus:\n  h200: "
                      "{on_demand: 1, spot: 1}\n")
    unpriced = mlpe(*args, env={"MLPE_PRICES": str(prices)})
    assert unpriced.returncode == 2 and "Traceback" not in unpriced.stderr
    assert "prices: no price for GPU 'h100-sxm'" in unpriced.stderr
