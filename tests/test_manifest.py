"""manifest.json and engines.json that are damaged or edited are refused with the file's name, never run."""
from __future__ import annotations

import json
import shutil

import pytest

from dlexport.engines.build import build_engines
from dlexport.errors import CorruptFileError, DlexportError
from dlexport.manifest import Manifest
from dlexport.runtime import Runtime


def _copy(export, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(export.folder, folder)
    return folder, json.loads((folder / "manifest.json").read_text())


def _write(folder, name, data):
    (folder / name).write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda d: [d], "holds a JSON list, not an object"),
    (lambda d: {**d, "subgraphs": {k: v for k, v in d["subgraphs"].items() if k != "layer_03"}}, "lacks layer_03"),
    (lambda d: {**d, "architecture": {**d["architecture"], "num_layers": 2}}, "has 6 entries but"),
    (lambda d: {**d, "architecture": {**d["architecture"], "num_layers": "4"}}, "not a positive integer"),
    (lambda d: {**d, "architecture": {**d["architecture"], "num_kv_heads": 2}}, "architecture.num_kv_heads is 2"),
    (lambda d: {**d, "architecture": {**d["architecture"], "vocab_size": 100}}, "architecture.vocab_size is 100"),
    (lambda d: {**d, "dtype": "int3"}, "'dtype' is 'int3'"),
    (lambda d: {k: v for k, v in d.items() if k != "architecture"}, "'architecture' is missing"),
    (lambda d: {**d, "subgraphs": {**d["subgraphs"], "head": {**d["subgraphs"]["head"], "files": [
        {"path": "../../outside.onnx", "size": 1, "sha256": "0" * 64}]}}}, "outside the folder"),
])
def test_edited_or_damaged_manifest_is_refused(tiny_opt_export, tmp_path, edit, message):
    folder, data = _copy(tiny_opt_export, tmp_path)
    _write(folder, "manifest.json", edit(data))
    with pytest.raises(CorruptFileError, match=message) as info:
        Manifest.load(folder)
    assert "manifest.json" in str(info.value)


def test_architecture_edited_together_with_the_shapes_is_caught_by_the_onnx_graph(tiny_opt_export, tmp_path):
    folder, data = _copy(tiny_opt_export, tmp_path)
    data["architecture"]["num_kv_heads"] = 2
    for sub in data["subgraphs"].values():
        for spec in sub["inputs"] + sub["outputs"]:
            if spec["name"].startswith(("past_key_values", "present")):
                spec["shape"][1] = 2
    _write(folder, "manifest.json", data)
    Manifest.load(folder)  # consistent with itself ...
    with pytest.raises(CorruptFileError, match="in the ONNX graph but"):
        Runtime.load(folder)  # ... but not with the files


def test_engine_index_that_is_damaged_is_refused(tiny_opt_export, tmp_path):
    engines = tmp_path / "engines"
    build_engines(tiny_opt_export.folder, engines, backend="onnxruntime", progress=False, log=lambda *a: None)
    good = json.loads((engines / "engines.json").read_text())
    cases = [
        ([good], "holds a JSON list"),
        ({**good, "engines": {k: v for k, v in good["engines"].items() if k != "head"}}, "no head engine"),
        ({**good, "engines": {**good["engines"], "layer_99": good["engines"]["head"]}}, "not a subgraph"),
        ({**good, "manifest": {**good["manifest"], "architecture": {**good["manifest"]["architecture"],
                                                                    "num_layers": 3}}}, "its 'manifest'"),
        ({**good, "engines": {**good["engines"], "embed": {**good["engines"]["embed"], "file": "../x.onnx"}}},
         "outside the folder"),
        ({k: v for k, v in good.items() if k != "settings"}, "'settings'"),
    ]
    for data, message in cases:
        _write(engines, "engines.json", data)
        with pytest.raises(DlexportError, match=message) as info:
            Runtime.load(engines)
        assert "engines.json" in str(info.value)
