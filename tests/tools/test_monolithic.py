import json

from dlexport.runtime import Runtime
from dlexport.tools.monolithic import INFO, MonolithicModel, ensure_monolithic


def test_monolithic_graph_reproduces_the_stitched_greedy_tokens(tiny_llama_export, tiny_llama_mono):
    prompt = list(range(7, 30))
    mono = MonolithicModel(tiny_llama_mono, tiny_llama_export, threads=None)
    tokens, stamps = mono.generate_timed(prompt, 12)
    stitched = Runtime.load(tiny_llama_export.folder).generate([prompt], 12, stop_tokens=[]).tokens[0]
    assert tokens == stitched
    assert len(stamps) == 12 and stamps == sorted(stamps)


def test_monolithic_io_records_the_kv_convention(tiny_llama_export, tiny_llama_mono):
    info = json.loads((tiny_llama_mono / INFO).read_text())
    assert info["fingerprint"] == tiny_llama_export.fingerprint
    names = [s["name"] for s in info["inputs"]]
    assert names[:3] == ["input_ids", "position_ids", "attention_mask"]
    assert len(names) == 3 + 2 * tiny_llama_export.num_layers
    outputs = {s["name"]: s["shape"] for s in info["outputs"]}
    assert outputs["logits"][1] == 1  # last position only
    assert outputs["present.0.key"][2] == "tokens"  # new tokens only


def test_existing_export_is_reused(tiny_llama_export, tiny_llama_mono):
    def must_not_export():
        raise AssertionError("re-exported a monolithic graph that was already there")

    assert ensure_monolithic(tiny_llama_export, must_not_export, tiny_llama_mono, log=lambda *a: None) == tiny_llama_mono


def test_monolithic_graph_of_a_sliding_window_model_takes_both_masks(family_export, tmp_path):
    from dlexport.exporter import load_model

    manifest = family_export("tiny-gemma3")
    folder = ensure_monolithic(manifest, lambda: load_model("tiny-gemma3", random_weights=True).model, tmp_path,
                               log=lambda *a: None)
    names = [s["name"] for s in json.loads((folder / INFO).read_text())["inputs"]]
    assert names[:4] == ["input_ids", "position_ids", "attention_mask", "sliding_attention_mask"]
    prompt = list(range(7, 20))
    tokens, _ = MonolithicModel(folder, manifest).generate_timed(prompt, 12)  # 25 positions, window 4
    assert tokens == Runtime.load(manifest.folder).generate([prompt], 12, stop_tokens=[]).tokens[0]
