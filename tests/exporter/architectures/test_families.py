"""Each family on its tiny random config (built from the real config class): every subgraph against PyTorch, the
stitched greedy tokens against Hugging Face ``generate`` for one prompt and a left-padded batch of two, generating
well past the sliding windows (4 positions) of the configs that have them."""
from __future__ import annotations

import pytest
import torch

from dlexport.exporter import load_model
from dlexport.plans.stack import Stack
from dlexport.runtime import Runtime

FAMILIES = ["tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-phi3", "tiny-gemma3"]
WINDOWED = ["tiny-qwen2", "tiny-mistral", "tiny-gemma3"]
PROMPTS = [[5, 17, 301, 44, 9, 120, 77], [250, 3, 88]]
NEW_TOKENS = 20


def hf_generate(model, prompts, new_tokens, pad=0) -> list[list[int]]:
    """Hugging Face greedy ``generate`` on a left-padded batch, never stopping early."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return out[:, width:].tolist()


@pytest.fixture(scope="module")
def hf_models():
    made = {}

    def get(shape):
        if shape not in made:
            made[shape] = load_model(shape, random_weights=True).model
        return made[shape]

    return get


@pytest.mark.parametrize("shape", FAMILIES)
def test_every_subgraph_within_tolerance_and_greedy_equals_hf_generate(shape, family_export):
    manifest = family_export(shape)
    v = manifest.data["validation"]
    assert v["ok"], [c for c in v["subgraphs"] if not c["ok"]]
    names = {c["subgraph"] for c in v["subgraphs"]}
    assert names == {"embed", "head", *(manifest.layer_key(i) for i in range(manifest.num_layers))}
    assert v["end_to_end"]["result"] == "match"
    assert len(set(v["end_to_end"]["runtime"])) > 5  # varied tokens, so that equality is a real check


@pytest.mark.parametrize("shape", FAMILIES)
def test_left_padded_batch_of_two_equals_hf_generate(shape, family_export, hf_models):
    rt = Runtime.load(family_export(shape).folder)
    out = rt.generate(PROMPTS, NEW_TOKENS, stop_tokens=[])
    assert out.tokens == hf_generate(hf_models(shape), PROMPTS, NEW_TOKENS)
    assert rt.generate([PROMPTS[1]], NEW_TOKENS, stop_tokens=[]).tokens == hf_generate(
        hf_models(shape), [PROMPTS[1]], NEW_TOKENS)


@pytest.mark.parametrize("shape", FAMILIES)
def test_embed_layers_head_equal_the_hugging_face_forward(shape):
    """The wrappers in PyTorch (the modules the graphs are exported from) give HF's own logits: embedding scale,
    rotary kinds, per-layer masks and the logit soft cap included."""
    model = load_model(shape, random_weights=True).model
    ids = torch.tensor([PROMPTS[0] * 2])
    with torch.no_grad():
        expected = model(ids).logits
    stack = Stack(model)
    hidden, extras = stack.embed(ids)
    got = stack.logits(stack.run(hidden, extras, range(stack.num_layers)))
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", WINDOWED)
def test_without_its_sliding_windows_the_runtime_would_not_match(shape, family_export, hf_models):
    """The windows bite: the same export with global masks everywhere gives other tokens than HF."""
    manifest = family_export(shape)
    windows = manifest.arch["layer_windows"]
    assert 4 in windows
    rt = Runtime.load(manifest.folder)
    rt.windows = [None] * manifest.num_layers
    assert rt.generate(PROMPTS, NEW_TOKENS, stop_tokens=[]).tokens != hf_generate(hf_models(shape), PROMPTS, NEW_TOKENS)


def test_gemma3_records_its_layer_kinds_and_rotary_pairs(family_export):
    m = family_export("tiny-gemma3")
    assert m.arch["model_type"] == "gemma3_text" and m.arch["layer_windows"] == [4, None, 4, 4, None]
    embed_out = [s["name"] for s in m.subgraph("embed")["outputs"]]
    assert embed_out == ["hidden_states", "rotary_cos", "rotary_sin", "rotary_cos_local", "rotary_sin_local"]
    local, glob = ([s["name"] for s in m.subgraph(m.layer_key(i))["inputs"]] for i in (0, 1))
    assert local == ["hidden_states", "attention_mask", "rotary_cos_local", "rotary_sin_local",
                     "past_key_values.0.key", "past_key_values.0.value", "past_length"]
    assert glob[2:4] == ["rotary_cos", "rotary_sin"]
    assert glob[4:] == ["past_key_values.1.key", "past_key_values.1.value", "past_length"]
    from dlexport.exporter.inspect import describe

    assert "attention    layers 0, 2, 3: sliding window of 4; layers 1, 4: global" in describe(m.folder)


def test_phi3_partial_rotary_exports_narrow_cos_sin(family_export):
    m = family_export("tiny-phi3")
    cos = next(s for s in m.subgraph("layer_00")["inputs"] if s["name"] == "rotary_cos")
    assert cos["shape"] == ["batch", "tokens", 8] and m.arch["head_dim"] == 16


@pytest.mark.parametrize("shape", FAMILIES)
def test_loads_from_a_local_hugging_face_folder(shape, tmp_path):
    from dlexport.exporter.architectures import architecture_for

    made = load_model(shape, random_weights=True).model
    made.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model) is type(made) and loaded.source == str(tmp_path)
    theirs = loaded.model.state_dict()
    assert all(torch.equal(t, theirs[k]) for k, t in made.state_dict().items())
    assert architecture_for(loaded.model).numbers == architecture_for(made).numbers


def test_gemma3_in_float16_is_refused_with_the_dtypes_that_work():
    from dlexport.exporter.architectures import UnsupportedModelError, architecture_for

    model = load_model("tiny-gemma3", random_weights=True, dtype="fp16").model
    with pytest.raises(UnsupportedModelError, match="outgrows float16.*bf16 or fp32 \\(--dtype"):
        architecture_for(model)
