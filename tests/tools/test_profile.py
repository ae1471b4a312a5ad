import pytest

from dlexport.tools.costs import CostTable
from dlexport.tools.profile import run_profile


def test_builtin_profile_covers_every_engine_phase_and_context(tiny_llama_export, tmp_path):
    table = run_profile(tiny_llama_export.folder, contexts=[8, 32], log=lambda *a: None)
    names = {"embed", "head"} | {tiny_llama_export.layer_key(i) for i in range(tiny_llama_export.num_layers)}
    keys = {(e["engine"], e["phase"], e["context"]) for e in table.entries}
    assert keys == {(n, p, c) for n in names for p in ("prefill", "decode") for c in (8, 32)}
    for e in table.entries:
        assert 0 < e["median_ms"] <= e["p90_ms"] and e["runs"] >= 5
    assert table.meta["backend"] == "onnxruntime" and table.meta["device"]["kind"] == "cpu"
    assert table.meta["versions"]["onnxruntime"]
    table.save(tmp_path / "profile.json")
    assert CostTable.load(tmp_path / "profile.json").contexts == [8, 32]


def test_unknown_tool_is_refused(tiny_llama_export):
    with pytest.raises(ValueError, match="builtin, trtexec"):
        run_profile(tiny_llama_export.folder, tool="nsys")
