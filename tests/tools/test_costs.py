import pytest

from dlexport.runtime import Plan
from dlexport.tools.costs import CostTable, phase_shape


def _table():
    entries = []
    for engine, base in (("embed", 0.1), ("head", 4.0), ("layer_00", 1.0), ("layer_01", 1.0), ("layer_02", 2.0)):
        for context, scale in ((128, 1.0), (512, 2.0)):
            entries.append({"engine": engine, "phase": "decode", "context": context, "median_ms": base * scale,
                            "p90_ms": base * scale * 1.5})
            entries.append({"engine": engine, "phase": "prefill", "context": context, "median_ms": base * scale * 10,
                            "p90_ms": base * scale * 15})
    return CostTable(entries, {"tool": "builtin"})


def test_phase_shapes_follow_the_runtime_kv_convention():
    assert phase_shape("decode", 512, "layer_00") == {"batch": 1, "tokens": 1, "past": 512, "past_plus_tokens": 513}
    assert phase_shape("prefill", 64, "layer_00")["tokens"] == 64
    assert phase_shape("prefill", 64, "head")["tokens"] == 1  # the runtime projects only the last position
    with pytest.raises(ValueError, match="unknown phase"):
        phase_shape("train", 64, "embed")


def test_cost_interpolates_between_contexts_and_clamps_outside():
    t = _table()
    assert t.cost("layer_00", "decode", 128) == 1.0
    assert t.cost("layer_00", "decode", 320) == pytest.approx(1.5)
    assert t.cost("layer_00", "decode", 64) == 1.0
    assert t.cost("layer_00", "decode", 4096) == 2.0
    with pytest.raises(KeyError, match="layer_09"):
        t.cost("layer_09", "decode", 128)


def test_predict_sums_embed_layers_and_head():
    p = _table().predict(["layer_00", "layer_02"], 128)
    assert p["total_ms"] == pytest.approx(0.1 + 1.0 + 2.0 + 4.0)
    assert p["layers"] == pytest.approx(3.0)


def test_predict_plan_and_round_trip(tmp_path, tiny_llama_export):
    t = _table()
    t.save(tmp_path / "profile.json")
    loaded = CostTable.load(tmp_path / "profile.json")
    assert loaded.contexts == [128, 512] and loaded.meta["tool"] == "builtin"
    plan = Plan.skip(tiny_llama_export, [0, 1])
    assert loaded.predict_plan(plan, tiny_llama_export, 128)["total_ms"] == pytest.approx(0.1 + 2.0 + 4.0)
    assert "| layer_02 |" in loaded.markdown()


def test_load_refuses_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something"}')
    with pytest.raises(ValueError, match="dlexport profile"):
        CostTable.load(tmp_path / "x.json")
