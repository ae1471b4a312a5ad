"""Quality of a quantised export against its source: per-subgraph errors and held-out perplexity/agreement."""
from __future__ import annotations

import pytest

from dlexport.cli import main
from dlexport.manifest import Manifest
from dlexport.plans.calibrate import TextConfig
from dlexport.plans.quality import MIN_TOKENS, compare_to_source, validate_quantized


def quiet(*args):
    pass


def test_an_export_against_itself_agrees_exactly(tiny_llama_export):
    r = compare_to_source(tiny_llama_export.folder, reference=tiny_llama_export.folder, log=quiet)
    assert r["agreement"] == 1.0 and r["perplexity"]["ratio"] == 1.0 and r["tokens"] >= MIN_TOKENS
    assert all(s["max_abs_diff"] == 0.0 for s in r["subgraphs"])


@pytest.mark.parametrize("weights,fmt", [("int4", "ort"), ("int8", "qdq")])
def test_quantised_export_reports_errors_and_quality_into_its_manifest(tiny_llama_export, quantized, weights, fmt):
    m = quantized("tiny_llama_export", weights, fmt)
    lines = []
    r = validate_quantized(m.folder, log=lines.append)
    assert r["tokens"] >= MIN_TOKENS and r["text"]["tokenizer"] == "bytes"  # the tiny model has no tokenizer
    assert [s["subgraph"] for s in r["subgraphs"]] == ["embed"] + [m.layer_key(i) for i in range(4)] + ["head"]
    assert r["subgraphs"][0]["max_abs_diff"] == 0.0  # the embedding is not quantised
    layers = r["subgraphs"][1:]
    assert all(0 < s["rel_rms"] < (0.5 if weights == "int4" else 0.05) for s in layers)
    assert all("rel_rms_update" in s for s in layers[:-1])
    assert 0.0 < r["agreement"] < 1.0 and 0.8 < r["perplexity"]["ratio"] < 1.25
    assert r["perplexity"]["reference"] == pytest.approx(
        compare_to_source(tiny_llama_export.folder, reference=tiny_llama_export.folder, log=quiet)
        ["perplexity"]["reference"])
    assert Manifest.load(m.folder).data["quantization"]["quality"] == r
    assert "perplexity" in lines[0] and "agreement" in lines[0]


def test_int8_agrees_more_than_int4(quantized):
    agree = {w: compare_to_source(quantized("tiny_opt_export", w, "ort").folder, log=quiet)["agreement"]
             for w in ("int4", "int8")}
    assert agree["int8"] > agree["int4"]


def test_dlexport_validate_on_a_quantised_export(quantized, capsys):
    m = quantized("tiny_opt_export", "int4", "qdq")
    assert main(["validate", str(m.folder)]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert "quality" in Manifest.load(m.folder).data["quantization"]


def test_refusals(tiny_llama_export, quantized, tmp_path):
    with pytest.raises(ValueError, match="not a quantised export"):
        compare_to_source(tiny_llama_export.folder, log=quiet)
    with pytest.raises(ValueError, match="fewer than 2000 tokens"):
        compare_to_source(quantized("tiny_llama_export", "int8", "ort").folder, text=TextConfig(eval_seqs=4),
                          log=quiet)
    with pytest.raises(ValueError, match="its own source export"):
        compare_to_source(quantized("tiny_opt_export", "int8", "ort").folder, reference=tiny_llama_export.folder,
                          log=quiet)


def test_other_models_are_scored_on_the_same_tokens(tiny_llama_export, quantized):
    from dlexport.plans.stack import ExportStack

    class Fp32Logits:  # the source export itself, through the logits interface: must score exactly as the reference
        info = {"what": "the fp32 export"}

        def __init__(self):
            self.stack = ExportStack(tiny_llama_export.folder)

        def logits(self, ids):
            hidden, extras = self.stack.embed(ids)
            return self.stack.logits(self.stack.run(hidden, extras, range(self.stack.num_layers)))

    lines = []
    r = compare_to_source(quantized("tiny_llama_export", "int8", "ort").folder, others={"fp32 again": Fp32Logits()},
                          log=lines.append)
    other = r["others"]["fp32 again"]
    assert other["perplexity"] == pytest.approx(r["perplexity"]["reference"], rel=1e-5)
    assert other["agreement"] == 1.0 and other["what"] == "the fp32 export"
    assert lines[-1].startswith("fp32 again on the same tokens: perplexity")
