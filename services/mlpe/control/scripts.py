"""Where a script job's code may come from: the controller runs it on the submitter's
behalf, so its script, module folder and working directory must exist on this machine
and lie under one of the allowed roots (Settings.control_script_roots), symlinks
resolved first."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path.is_relative_to(root.resolve()) for root in roots)


def check(entrypoint: dict, roots: tuple[Path, ...]) -> list[str]:
    """Problems ("field: reason") with the entry point's paths; fills in the resolved
    absolute paths (and working_dir's default, the script's folder) when there are none."""
    problems: list[str] = []
    allowed = ", ".join(map(str, roots)) or "none"
    hint = f"outside the allowed roots ({allowed}; the controller's MLPE_CONTROL_SCRIPT_ROOTS)"
    script = None
    if entrypoint["script"]:
        given = Path(entrypoint["script"])
        if not given.is_absolute():
            problems.append(f"entrypoint.script: {given} is not an absolute path (the CLI "
                            "makes it absolute)")
        elif not given.is_file():
            problems.append(f"entrypoint.script: no file {given}")
        elif not _inside(given.resolve(), roots):
            problems.append(f"entrypoint.script: {given} is {hint}")
        else:
            script = given.resolve()
    working = entrypoint["working_dir"] or (str(script.parent) if script else "")
    if working:
        given = Path(working)
        if not given.is_absolute():
            problems.append(f"entrypoint.working_dir: {given} is not an absolute path")
        elif not given.is_dir():
            problems.append(f"entrypoint.working_dir: no folder {given}")
        elif not _inside(given.resolve(), roots):
            problems.append(f"entrypoint.working_dir: {given} is {hint}")
        elif entrypoint["module"]:
            top = entrypoint["module"].split(".")[0]
            # in the working folder, or installed in the environment jobs run in
            found = (importlib.machinery.PathFinder.find_spec(top, [str(given)]) or
                     importlib.machinery.PathFinder.find_spec(top))
            if found is None:
                problems.append(f"entrypoint.module: no module {top!r} in {given} or "
                                "installed")
    if not problems:
        if script:
            entrypoint["script"] = str(script)
        entrypoint["working_dir"] = str(Path(working).resolve())
    return problems
