"""Where a script job's code, and a Hugging Face model's files, may come from: the
controller runs them on the submitter's behalf, so its script, module folder, working
directory and model files must exist on this machine and lie under one of the allowed
roots (Settings.control_script_roots), symlinks resolved first."""

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


def check_model(hf: dict, roots: tuple[Path, ...]) -> list[str]:
    """Problems with a Hugging Face model's local files (the config file, or the folder
    of a pretrained model with its config.json), which must lie under the allowed roots
    like a script; fills in their resolved absolute paths when there are none."""
    import json

    problems: list[str] = []
    for field, given_text in (("model.hf_config", hf["config_path"]),
                              ("model.hf_pretrained", hf["pretrained"])):
        if not given_text:
            continue
        given = Path(given_text)
        config = given / "config.json" if field.endswith("pretrained") or given.is_dir() \
            else given
        if not given.is_absolute():
            problems.append(f"{field}: {given} is not an absolute path (the CLI makes it "
                            "absolute)")
        elif not config.is_file():
            problems.append(f"{field}: no file {config}")
        elif not _inside(config.resolve(), roots):
            allowed = ", ".join(map(str, roots)) or "none"
            problems.append(f"{field}: {given} is outside the allowed roots ({allowed}; "
                            "the controller's MLPE_CONTROL_SCRIPT_ROOTS)")
        else:
            try:
                model_type = json.loads(config.read_text()).get("model_type")
            except (OSError, ValueError, AttributeError) as err:
                problems.append(f"{field}: {config} is not a JSON config: {err}")
                continue
            if not isinstance(model_type, str):
                problems.append(f'{field}: {config} has no "model_type"')
                continue
            key = "config_path" if field.endswith("config") else "pretrained"
            hf[key] = str((config if key == "config_path" else given).resolve())
    return problems
