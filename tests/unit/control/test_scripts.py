"""A script job's spec: what resolve() checks without the filesystem, and the
controller's path checks (exists, absolute, under an allowed root, symlinks resolved)."""

import os

from mlpe.common.jobs import resolve
from mlpe.control import scripts
from mlpe.v1 import control_pb2 as c


def entry(**fields) -> dict:
    resolved, problems = resolve(c.JobSpec(entrypoint=c.Entrypoint(**fields)))
    assert problems == [], problems
    return resolved["entrypoint"]


def test_a_script_job_needs_no_steps_and_keeps_its_fields():
    resolved, problems = resolve(c.JobSpec(world_size=2, entrypoint=c.Entrypoint(
        script="/x/train.py", args=["--lr", "3e-4"], env={"WANDB_MODE": "offline"})))
    assert problems == []
    assert resolved["entrypoint"] == {"script": "/x/train.py", "module": "", "args":
                                      ["--lr", "3e-4"], "working_dir": "",
                                      "env": {"WANDB_MODE": "offline"}, "nproc_per_node": 2}
    assert resolved["steps"] == 0 and resolve(c.JobSpec(steps=1))[0]["entrypoint"] is None


def test_paths_are_resolved_inside_the_roots(tmp_path):
    (tmp_path / "job").mkdir()
    script = tmp_path / "job" / "train.py"
    script.write_text("print('hi')\n")
    e = entry(script=str(script))
    assert scripts.check(e, (tmp_path,)) == []
    assert e["script"] == str(script) and e["working_dir"] == str(tmp_path / "job")


def test_a_symlink_out_of_the_roots_is_refused(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "evil.py").write_text("")
    os.symlink(elsewhere / "evil.py", root / "innocent.py")
    problems = scripts.check(entry(script=str(root / "innocent.py")), (root,))
    assert len(problems) == 1 and "outside the allowed roots" in problems[0]
    assert "MLPE_CONTROL_SCRIPT_ROOTS" in problems[0]


def test_missing_and_relative_paths_and_unknown_modules(tmp_path):
    assert "no file" in scripts.check(entry(script=str(tmp_path / "none.py")),
                                      (tmp_path,))[0]
    assert "not an absolute path" in scripts.check(entry(script="train.py"), (tmp_path,))[0]
    assert "no folder" in scripts.check(entry(module="pkg", working_dir=str(
        tmp_path / "none")), (tmp_path,))[0]
    assert "no module 'nosuchpkg'" in scripts.check(entry(
        module="nosuchpkg.train", working_dir=str(tmp_path)), (tmp_path,))[0]
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    assert scripts.check(entry(module="mypkg.train", working_dir=str(tmp_path)),
                         (tmp_path,)) == []
    assert scripts.check(entry(module="json.tool", working_dir=str(tmp_path)),
                         (tmp_path,)) == []  # installed in the jobs' environment


def test_no_roots_refuses_everything(tmp_path):
    (tmp_path / "t.py").write_text("")
    assert "allowed roots (none" in scripts.check(entry(script=str(tmp_path / "t.py")),
                                                  ())[0]
