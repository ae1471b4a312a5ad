"""The model repository serve-repo writes (no server needed)."""
from __future__ import annotations

import json

import pytest

from dlexport.errors import FolderError, InputError, MissingFileError
from dlexport.runtime import ExitPolicy, Plan, load_plan
from dlexport.serving.environment import check_env
from dlexport.serving.repository import RepoSettings, read_serving, write_repository


def test_repository_layout_references_the_folder(tiny_llama_export, served_plans, tmp_path):
    model = write_repository(tiny_llama_export.folder, tmp_path / "repo", RepoSettings(plans=served_plans))
    s = read_serving(model)
    assert s["folder"] == str(tiny_llama_export.folder.resolve()) and s["fingerprint"] == tiny_llama_export.fingerprint
    assert not list(model.rglob("*.onnx")), "the export is referenced, never copied"
    for name in served_plans:
        assert load_plan(model / s["plans"][name], tiny_llama_export) == load_plan(served_plans[name],
                                                                                   tiny_llama_export)
    config = (model / "config.pbtxt").read_text()
    assert "dynamic_batching" in config and "decoupled" not in config and "KIND_CPU" in config
    assert "from dlexport.serving.backend import TritonPythonModel" in (model / "1" / "model.py").read_text()
    assert s["lookup"] == 0 and s["learning"] == "learning.json"
    assert "dlexport/learning.json" in json.loads((tmp_path / "repo" / ".dlexport-folder.json").read_text())["files"]


def test_learning_and_lookup_settings(tiny_llama_export, tmp_path):
    s = read_serving(write_repository(tiny_llama_export.folder, tmp_path / "repo",
                                      RepoSettings(lookup=3, learning=False)))
    assert s["lookup"] == 3 and s["learning"] is None


def test_settings_shape_the_config(tiny_llama_export, tmp_path):
    model = write_repository(tiny_llama_export.folder, tmp_path / "repo",
                             RepoSettings(name="smol", batching=False, streaming=True, instances=3, device="cuda"))
    config = (model / "config.pbtxt").read_text()
    assert 'name: "smol"' in config and "dynamic_batching" not in config
    assert "model_transaction_policy { decoupled: true }" in config and "kind: KIND_GPU count: 3" in config


def test_rewriting_replaces_only_dlexport_files(tiny_llama_export, served_plans, tmp_path):
    repo = tmp_path / "repo"
    write_repository(tiny_llama_export.folder, repo, RepoSettings(plans=served_plans))
    (repo / "notes.txt").write_text("mine")
    model = write_repository(tiny_llama_export.folder, repo, RepoSettings(plans={"skip": served_plans["skip"]}))
    assert sorted(p.name for p in (model / "plans").iterdir()) == ["skip.json"]
    assert (repo / "notes.txt").read_text() == "mine"
    files = json.loads((repo / ".dlexport-folder.json").read_text())["files"]
    assert "notes.txt" not in files and "dlexport/plans/exit.json" not in files


def test_plan_adapters_travel_with_the_plan(tiny_llama_export, tmp_path):
    import hashlib

    folder = tmp_path / "plans"
    (folder / "adapters").mkdir(parents=True)
    (folder / "adapters" / "a1.onnx").write_bytes(b"not read here")
    sha = hashlib.sha256(b"not read here").hexdigest()
    data = Plan.skip(tiny_llama_export, range(4), exit=ExitPolicy((1,), "top1_prob", 0.5)).to_json()
    data["exit"]["adapters"] = [{"layer": 1, "file": "adapters/a1.onnx", "sha256": sha}]
    (folder / "p.json").write_text(json.dumps(data))
    model = write_repository(tiny_llama_export.folder, tmp_path / "repo", RepoSettings(plans={"p": folder / "p.json"}))
    plan = load_plan(model / "plans" / "p.json", tiny_llama_export)
    assert plan.exit.adapter_path(1).read_bytes() == b"not read here"


@pytest.mark.parametrize("settings,words", [
    (RepoSettings(name="a b"), "model name"),
    (RepoSettings(instances=0), "instances"),
    (RepoSettings(plans={"full": "x.json"}), "'full' always serves every layer"),
    (RepoSettings(lookup=-2), "default lookup"),
])
def test_bad_settings_are_refused(tiny_llama_export, tmp_path, settings, words):
    with pytest.raises(InputError, match=words):
        write_repository(tiny_llama_export.folder, tmp_path / "repo", settings)


def test_a_users_folder_is_never_written(tiny_llama_export, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "file.txt").write_text("x")
    with pytest.raises(FolderError, match="not empty and was not made by dlexport"):
        write_repository(tiny_llama_export.folder, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["file.txt"]
    with pytest.raises(MissingFileError, match="neither an export"):
        write_repository(tmp_path / "mine", tmp_path / "repo")


def test_a_missing_environment_names_the_command(tmp_path):
    with pytest.raises(MissingFileError, match="dlexport serve --prepare-env"):
        check_env(tmp_path / "none")


def test_serve_repo_cli_options(tiny_llama_export, tmp_path):
    from dlexport.cli import main

    assert main(["serve-repo", str(tiny_llama_export.folder), "--out", str(tmp_path / "repo"), "--lookup", "3",
                 "--no-learning"]) == 0
    s = read_serving(tmp_path / "repo" / "dlexport")
    assert s["lookup"] == 3 and s["learning"] is None
