"""Export of both architectures, resuming, and the refusals that protect an export folder."""
from __future__ import annotations

import json

import onnx
import pytest

from dlexport.engines.build import build_engines
from dlexport.errors import FolderError
from dlexport.exporter import ExportDirError
from dlexport.pipeline import export
from dlexport.exporter import onnx_export as export_module
from dlexport.manifest import Manifest


@pytest.mark.parametrize("fixture", ["tiny_llama_export", "tiny_opt_export"])
def test_export_writes_every_subgraph_and_validates(fixture, request):
    manifest: Manifest = request.getfixturevalue(fixture)
    folder = manifest.folder
    n = manifest.num_layers
    assert (folder / "embed.onnx").exists() and (folder / "head.onnx").exists()
    assert sorted(p.name for p in (folder / "layers").glob("*.onnx")) == [f"layer_{i:02d}.onnx" for i in range(n)]
    v = manifest.data["validation"]
    assert v["ok"] and v["end_to_end"]["result"] == "match"
    assert {c["case"] for c in v["subgraphs"]} == {"prefill", "decode", "batch2_left_padded"}
    assert len(v["end_to_end"]["runtime"]) == 32
    manifest.verify_files()


def test_manifest_records_architecture_files_and_io(tiny_llama_export, tiny_llama_portable_export):
    m = tiny_llama_export.data
    assert m["architecture"] == {"model_type": "llama", "num_layers": 4, "hidden_size": 64, "num_heads": 4,
                                 "num_kv_heads": 2, "head_dim": 16, "vocab_size": 512, "max_positions": 256,
                                 "layer_windows": [None] * 4}
    assert m["dtype"] == "float32" and m["opset"] == 18 and len(m["fingerprint"]) == 32
    layer = m["subgraphs"]["layer_02"]
    names = [s["name"] for s in layer["inputs"]]
    assert m["kv"] == "inplace"  # the default flavour: the cache buffer is the layer's past and present
    assert names == ["hidden_states", "attention_mask", "rotary_cos", "rotary_sin",
                     "past_key_values.2.key", "past_key_values.2.value", "past_length"]
    assert [s["name"] for s in layer["outputs"]] == ["hidden_states_out", "present.2.key", "present.2.value"]
    assert layer["inputs"][4]["shape"] == layer["outputs"][1]["shape"] == ["batch", 2, "capacity", 16]
    assert layer["inputs"][6] == {"name": "past_length", "shape": ["batch"], "dtype": "int64"}
    portable = tiny_llama_portable_export.data
    layer = portable["subgraphs"]["layer_02"]
    assert portable["kv"] == "portable" and portable["fingerprint"] == m["fingerprint"]
    assert [s["name"] for s in layer["inputs"]] == names[:-1]
    assert layer["inputs"][4]["shape"] == ["batch", 2, "past", 16]
    assert layer["outputs"][1]["shape"] == ["batch", 2, "tokens", 16]


@pytest.mark.parametrize("fixture, past, opset", [("tiny_opt_export", "capacity", 24),
                                                  ("tiny_opt_portable_export", "past", 18)])
def test_onnx_graph_dims_carry_the_contract_names(fixture, past, opset, request):
    manifest = request.getfixturevalue(fixture)
    model = onnx.load(manifest.path("layer_01"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["attention_mask"] == ["batch", 1, "tokens", "past_plus_tokens"]
    assert dims["past_key_values.1.key"] == ["batch", 4, past, 16]
    assert "rotary_cos" not in dims  # OPT has learned positions, no rotary inputs
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    ops = {n.op_type for n in model.graph.node}
    assert ("TensorScatter" in ops) == (past == "capacity")


@pytest.mark.parametrize("shape", ["tiny-opt-project", "tiny-opt-postnorm"])
def test_opt_variants_project_in_out_and_post_layer_norm(shape, tmp_path):
    manifest = export(shape, tmp_path / shape, random_weights=True, progress=False, log=lambda *a: None)
    assert manifest.data["validation"]["end_to_end"]["result"] == "match"


def test_fp16_export_validates_per_subgraph(tmp_path):
    manifest = export("tiny-llama", tmp_path / "fp16", random_weights=True, dtype="fp16", progress=False,
                      log=lambda *a: None)
    assert manifest.dtype == "float16"
    graph = onnx.load(manifest.path("layer_00")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert manifest.data["validation"]["ok"]


def test_interrupted_export_resumes_from_finished_files(tmp_path, monkeypatch):
    out = tmp_path / "resume"
    real = export_module.export_subgraph
    calls = []

    def interrupt_at_layer_02(arch, sub, path, opset, traces):
        calls.append(sub.name)
        if sub.name == "layer_02":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half a file")
            raise KeyboardInterrupt
        real(arch, sub, path, opset, traces)

    monkeypatch.setattr(export_module, "export_subgraph", interrupt_at_layer_02)
    with pytest.raises(KeyboardInterrupt):
        export("tiny-opt", out, random_weights=True, progress=False, log=lambda *a: None)
    assert not (out / "layers" / "layer_02.onnx").exists()  # the half-written file never takes the final name
    assert not (out / "manifest.json").exists()

    calls.clear()
    monkeypatch.setattr(export_module, "export_subgraph", lambda *a: (calls.append(a[1].name), real(*a)))
    manifest = export("tiny-opt", out, random_weights=True, progress=False, log=lambda *a: None)
    assert calls == ["layer_02", "layer_03", "head"]
    assert manifest.data["validation"]["ok"]
    assert not (out / ".partial").exists() and not (out / export_module.JOURNAL).exists()

    calls.clear()
    (out / "layers" / "layer_01.onnx").write_bytes(b"corrupted")  # a damaged file is redone, not trusted
    export("tiny-opt", out, random_weights=True, progress=False, validate=False, log=lambda *a: None)
    assert calls == ["layer_01"]

    calls.clear()
    data = json.loads((out / "manifest.json").read_text())
    data["subgraphs"]["layer_00"]["inputs"][0]["name"] = "hidden"  # as written by an older I/O contract
    (out / "manifest.json").write_text(json.dumps(data))
    export("tiny-opt", out, random_weights=True, progress=False, validate=False, log=lambda *a: None)
    assert calls == ["layer_00"]


def test_folder_holding_another_models_export_is_refused(tiny_opt_export, tmp_path):
    out = tmp_path / "taken"
    export("tiny-opt", out, random_weights=True, progress=False, validate=False, log=lambda *a: None)
    with pytest.raises(ExportDirError, match="another model.*--overwrite"):
        export("tiny-llama", out, random_weights=True, progress=False, validate=False, log=lambda *a: None)
    assert json.loads((out / "manifest.json").read_text())["source"] == "random:tiny-opt:seed0"  # nothing lost
    manifest = export("tiny-llama", out, random_weights=True, progress=False, validate=False, overwrite=True,
                      log=lambda *a: None)
    assert manifest.arch["model_type"] == "llama"


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gemma3"])
def test_layers_from_one_trace_per_structure_equal_layers_traced_one_by_one(shape, tmp_path, monkeypatch):
    """Fast export gives the very files per-layer tracing gives; Gemma 3's local and global layers trace apart."""
    traced = []
    real = export_module._trace
    monkeypatch.setattr(export_module, "_trace", lambda arch, sub, opset: (traced.append(sub.name),
                                                                           real(arch, sub, opset))[1])
    kw = dict(random_weights=True, progress=False, validate=False, log=lambda *a: None)
    fast = export(shape, tmp_path / "fast", **kw)
    fast_traced, traced[:] = list(traced), []
    slow = export(shape, tmp_path / "slow", reuse_traces=False, **kw)
    assert {"tiny-llama": ["embed", "layer_00", "head"],
            "tiny-gemma3": ["embed", "layer_00", "layer_01", "head"]}[shape] == fast_traced
    assert len(traced) == slow.num_layers + 2
    for name, entry in slow.data["subgraphs"].items():
        assert fast.subgraph(name)["files"] == entry["files"], name


def test_overwrite_replaces_only_dlexports_files_and_keeps_the_users(tmp_path):
    out = tmp_path / "taken"
    export("tiny-opt", out, random_weights=True, progress=False, validate=False, log=lambda *a: None)
    (out / "notes.txt").write_text("mine")
    (out / "layers" / "my_layer.onnx").write_text("my own graph")
    export("tiny-llama", out, random_weights=True, progress=False, validate=False, overwrite=True, log=lambda *a: None)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "layers" / "my_layer.onnx").read_text() == "my own graph"
    assert json.loads((out / "manifest.json").read_text())["source"] == "random:tiny-llama:seed0"


def test_export_refuses_folders_that_are_not_its_own(tiny_opt_export, tmp_path):
    user = tmp_path / "mine"
    (user / "src").mkdir(parents=True)
    (user / "embed.onnx").write_text("my own graph")
    engines = tmp_path / "engines"
    build_engines(tiny_opt_export.folder, engines, backend="onnxruntime", progress=False, log=lambda *a: None)
    before = {p: p.read_bytes() for p in engines.rglob("*") if p.is_file()}
    (tmp_path / "file").write_text("data")
    for out, message in [(user, "not empty and was not made by dlexport"),
                         (engines, "holds a dlexport engines, not a export"),
                         (tmp_path / "file", "is a file, not a folder")]:
        for overwrite in (False, True):
            with pytest.raises(FolderError, match=message):
                export("tiny-opt", out, random_weights=True, progress=False, validate=False, overwrite=overwrite,
                       log=lambda *a: None)
    assert (user / "embed.onnx").read_text() == "my own graph" and (user / "src").is_dir()
    assert before == {p: p.read_bytes() for p in engines.rglob("*") if p.is_file()}
    assert (tmp_path / "file").read_text() == "data"


def test_an_export_from_before_ownership_markers_resumes_but_not_with_a_users_file(tmp_path, monkeypatch):
    from dlexport.files import OWNER

    out = tmp_path / "old"
    export("tiny-opt", out, random_weights=True, progress=False, validate=False, log=lambda *a: None)
    (out / OWNER).unlink()  # as an older dlexport left it
    calls = []
    real = export_module.export_subgraph
    monkeypatch.setattr(export_module, "export_subgraph", lambda *a: (calls.append(a[1].name), real(*a)))
    export("tiny-opt", out, random_weights=True, progress=False, validate=False, log=lambda *a: None)
    assert calls == [] and (out / OWNER).exists()
    (out / OWNER).unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FolderError, match="not made by dlexport"):
        export("tiny-opt", out, random_weights=True, progress=False, validate=False, log=lambda *a: None)


def test_inplace_grouped_query_attention_reads_the_filled_cache_without_repeating_it(tiny_llama_export,
                                                                                      tiny_llama_portable_export):
    ops = {name: [n.op_type for n in onnx.load(m.path(m.layer_key(0)), load_external_data=False).graph.node]
           for name, m in (("inplace", tiny_llama_export), ("portable", tiny_llama_portable_export))}
    assert ops["portable"].count("Expand") == 2  # HF's repeat_kv, kept in the portable flavour
    assert "Expand" not in ops["inplace"] and ops["inplace"].count("TensorScatter") == 2
    # (the export fixture validated these layers against PyTorch, prefill and decode)
