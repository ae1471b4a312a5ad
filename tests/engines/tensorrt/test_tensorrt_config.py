"""Presets, shape limits and the prefill/decode profiles they imply (no TensorRT needed)."""
import pytest

from dlexport.engines.tensorrt.config import GiB, PRESETS, ShapeLimits, profiles_for, select_profile, settings_for

LAYER_INPUTS = [
    {"name": "hidden_states", "shape": ["batch", "tokens", 64], "dtype": "float32"},
    {"name": "attention_mask", "shape": ["batch", 1, "tokens", "past_plus_tokens"], "dtype": "float32"},
    {"name": "past_key_values.0.key", "shape": ["batch", 2, "past", 16], "dtype": "float32"},
]
EMBED_INPUTS = [{"name": "input_ids", "shape": ["batch", "tokens"], "dtype": "int64"}]


def test_profiles_cover_prefill_and_decode_with_consistent_key_lengths():
    limits = ShapeLimits(max_batch=4, max_prompt=512, max_context=2048, max_decode_tokens=8)
    prefill, decode = profiles_for(LAYER_INPUTS, limits)
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    assert prefill["shapes"]["hidden_states"] == {"min": [1, 1, 64], "opt": [1, 128, 64], "max": [4, 512, 64]}
    assert prefill["shapes"]["past_key_values.0.key"]["min"] == [1, 2, 0, 16]
    assert prefill["shapes"]["past_key_values.0.key"]["max"] == [4, 2, 2048, 16]
    assert decode["shapes"]["hidden_states"]["max"] == [4, 8, 64]
    assert decode["shapes"]["past_key_values.0.key"]["min"] == [1, 2, 1, 16]
    for profile in (prefill, decode):
        for point in ("min", "opt", "max"):
            mask = profile["shapes"]["attention_mask"][point]
            past = profile["shapes"]["past_key_values.0.key"][point][2]
            tokens = profile["shapes"]["hidden_states"][point][1]
            assert mask == [mask[0], 1, tokens, past + tokens]


def test_profiles_of_a_graph_without_cache():
    prefill, decode = profiles_for(EMBED_INPUTS, ShapeLimits(2, 16, 64, 4))
    assert prefill["shapes"] == {"input_ids": {"min": [1, 1], "opt": [1, 16], "max": [2, 16]}}
    assert decode["shapes"] == {"input_ids": {"min": [1, 1], "opt": [1, 1], "max": [2, 4]}}


def test_select_profile_by_new_tokens_and_refuses_shapes_outside_every_profile():
    profiles = profiles_for(LAYER_INPUTS, ShapeLimits(2, 64, 128, 4))

    def shapes(batch, tokens, past):
        return {"hidden_states": (batch, tokens, 64), "attention_mask": (batch, 1, tokens, past + tokens),
                "past_key_values.0.key": (batch, 2, past, 16)}

    assert profiles[select_profile(profiles, shapes(1, 1, 100))]["name"] == "decode"
    assert profiles[select_profile(profiles, shapes(2, 4, 100))]["name"] == "decode"
    assert profiles[select_profile(profiles, shapes(1, 40, 100))]["name"] == "prefill"
    assert profiles[select_profile(profiles, shapes(1, 1, 0))]["name"] == "prefill"  # empty cache: only prefill
    with pytest.raises(ValueError, match="--max-prompt"):
        select_profile(profiles, shapes(1, 65, 100))
    with pytest.raises(ValueError, match="outside every optimisation profile"):
        select_profile(profiles, shapes(3, 1, 10))


def test_presets_and_explicit_overrides():
    orin = settings_for("tensorrt", "float16", "jetson-orin", max_positions=2048)
    assert (orin.workspace_bytes, orin.optimization_level) == (1 * GiB, 3)
    assert (orin.limits.max_batch, orin.limits.max_prompt, orin.limits.max_context) == (1, 512, 2048)
    dc = settings_for("tensorrt", "float16", "datacenter", max_positions=8192)
    assert dc.workspace_bytes == PRESETS["datacenter"].workspace_bytes and dc.optimization_level == 4
    custom = settings_for("tensorrt", "float16", "datacenter", workspace_gib=0.5, optimization_level=1, max_batch=2,
                          max_prompt=64, max_context=256, max_positions=8192)
    assert (custom.workspace_bytes, custom.optimization_level) == (GiB // 2, 1)
    assert (custom.limits.max_batch, custom.limits.max_prompt, custom.limits.max_context) == (2, 64, 256)
    assert settings_for("tensorrt-rtx", "float32", max_positions=8192).target == "rtx"


def test_preset_limits_are_clipped_to_a_small_model_but_explicit_ones_are_checked():
    small = settings_for("tensorrt", "float32", "datacenter", max_positions=256)
    assert (small.limits.max_prompt, small.limits.max_context) == (256, 256)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        settings_for("tensorrt", "float32", "datacenter", max_context=512, max_positions=256)
    with pytest.raises(ValueError, match="raise --max-context or lower --max-prompt"):
        settings_for("tensorrt", "float32", max_prompt=300, max_context=200, max_positions=2048)


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="does not run on Jetson"):
        settings_for("tensorrt-rtx", "float16", "jetson-orin", max_positions=2048)
    with pytest.raises(ValueError, match="0..5"):
        settings_for("tensorrt", "float16", optimization_level=7, max_positions=2048)
    with pytest.raises(ValueError, match="unknown --target"):
        settings_for("tensorrt", "float16", "laptop", max_positions=2048)
