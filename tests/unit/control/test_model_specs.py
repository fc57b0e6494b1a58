"""A job's Hugging Face model and parallelism: what resolve() checks without the
filesystem, and the controller's checks of a model's local files (exists, JSON with a
model_type, under an allowed root)."""

import json

import pytest

from mlpe.common.jobs import resolve
from mlpe.control import scripts
from mlpe.v1 import control_pb2 as c

LLAMA = json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": 32})


def resolved(**fields) -> tuple[dict, list[str]]:
    return resolve(c.JobSpec(steps=2, **fields))


def test_defaults_are_the_built_in_gpt_under_ddp():
    spec, problems = resolved()
    assert problems == [] and spec["hf"] is None
    assert spec["parallelism"] == {"kind": "ddp", "cpu_offload": False,
                                   "reshard_after_forward": True}


def test_an_inline_config_and_fsdp_choices():
    spec, problems = resolved(model=c.ModelSpec(hf_config=LLAMA, seq_len=16),
                              parallelism=c.ParallelismSpec(kind="fsdp", cpu_offload=True,
                                                            reshard_after_forward=False))
    assert problems == []
    assert spec["hf"] == {"config": json.loads(LLAMA), "config_path": "", "pretrained": "",
                          "mlpe_kernels": True}
    assert spec["model"]["seq_len"] == 16
    assert spec["parallelism"] == {"kind": "fsdp", "cpu_offload": True,
                                   "reshard_after_forward": False}


@pytest.mark.parametrize("fields, message", [
    ({"model": c.ModelSpec(hf_config="{not json")}, "model.hf_config: not valid JSON"),
    ({"model": c.ModelSpec(hf_config='{"hidden_size": 8}')}, '"model_type"'),
    ({"model": c.ModelSpec(hf_config=LLAMA, hidden=64)}, "takes its shape from its config"),
    ({"model": c.ModelSpec(hf_config=LLAMA, hf_pretrained="/m")}, "got both"),
    ({"model": c.ModelSpec(hf_mlpe_kernels=False)}, "only with model.hf_config"),
    ({"parallelism": c.ParallelismSpec(kind="zero3")}, "parallelism.kind: one of ddp, fsdp"),
    ({"parallelism": c.ParallelismSpec(cpu_offload=True)}, "set kind 'fsdp'"),
    ({"device": "cpu", "parallelism": c.ParallelismSpec(kind="fsdp", cpu_offload=True)},
     "parallelism.cpu_offload: offloads GPU memory to the host; needs device cuda"),
])
def test_bad_model_and_parallelism_fields_are_named(fields, message):
    problems = resolved(**fields)[1]
    assert any(message in p for p in problems), problems


def test_a_script_job_brings_its_own_parallelism():
    problems = resolve(c.JobSpec(entrypoint=c.Entrypoint(script="/x/t.py"),
                                 parallelism=c.ParallelismSpec(kind="fsdp")))[1]
    assert any(p.startswith("parallelism: only for the built-in model") for p in problems)


def test_model_files_are_checked_and_resolved_inside_the_roots(tmp_path):
    folder = tmp_path / "models" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(LLAMA)
    hf = resolved(model=c.ModelSpec(hf_pretrained=str(folder)))[0]["hf"]
    assert scripts.check_model(hf, (tmp_path,)) == [] and hf["pretrained"] == str(folder)
    hf = resolved(model=c.ModelSpec(hf_config=str(folder)))[0]["hf"]  # a folder: its config
    assert scripts.check_model(hf, (tmp_path,)) == []
    assert hf["config_path"] == str(folder / "config.json")

    assert "outside the allowed roots" in scripts.check_model(
        dict(hf), (tmp_path / "elsewhere",))[0]
    (folder / "config.json").write_text('{"hidden_size": 8}')
    assert 'has no "model_type"' in scripts.check_model(
        {"config_path": "", "pretrained": str(folder)}, (tmp_path,))[0]
    assert "no file" in scripts.check_model(
        {"config_path": str(tmp_path / "missing.json"), "pretrained": ""}, (tmp_path,))[0]
    assert "not an absolute path" in scripts.check_model(
        {"config_path": "rel/config.json", "pretrained": ""}, (tmp_path,))[0]


def test_the_cli_flags_build_the_spec(tmp_path):
    import argparse

    from mlpe.control import client

    parser = argparse.ArgumentParser()
    client.register(parser.add_subparsers())
    (tmp_path / "config.json").write_text(LLAMA)
    args = parser.parse_args(["jobs", "submit", "--hf-config", str(tmp_path / "config.json"),
                              "--no-mlpe-kernels", "--parallelism", "fsdp",
                              "--no-reshard-after-forward", "--cpu-offload"])
    spec = client.build_spec(args)
    assert spec.model.hf_config == str(tmp_path / "config.json")
    assert spec.model.HasField("hf_mlpe_kernels") and not spec.model.hf_mlpe_kernels
    assert (spec.parallelism.kind, spec.parallelism.reshard_after_forward,
            spec.parallelism.cpu_offload) == ("fsdp", False, True)
    spec, problems = resolve(spec)[0], resolve(spec)[1]
    assert [p for p in problems if not p.startswith("steps")] == []
