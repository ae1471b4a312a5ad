"""What a quantised export costs in quality, measured against the export it was made from on held-out prose.

Per subgraph: each quantised layer (and the head) gets the fp32 graph's own input on real text and its output is
compared with the fp32 graph's (max |q - f| and relative RMS error): reported, not held to an fp32 tolerance. End to
end: the quantised graphs run the whole text (teacher-forced), giving held-out perplexity next to the fp32 export's
and top-1 agreement with the fp32 model, over at least ``MIN_TOKENS`` predicted tokens. Both sides are scored by
``Stack.score``, the scoring every plan tool uses.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..manifest import Manifest
from .calibrate import TextConfig
from .stack import ExportStack
from .text import load_splits, tokenizer_for

MIN_TOKENS = 2000


def _error(got: torch.Tensor, ref: torch.Tensor, layer_input: torch.Tensor | None = None) -> dict:
    """max |q - f|, and the RMS error relative to the output (and, for a layer, to what it adds to its input:
    the residual stream's outliers make the output-relative error of a layer look small)."""
    diff = (got - ref).float()
    err = {"max_abs_diff": float(diff.abs().max()), "max_abs_ref": float(ref.abs().max()),
           "rel_rms": float(diff.norm() / ref.float().norm().clamp_min(1e-30))}
    if layer_input is not None:
        err["rel_rms_update"] = float(diff.norm() / (ref - layer_input).float().norm().clamp_min(1e-30))
    return err


def compare_to_source(export_dir, *, reference=None, text: TextConfig = TextConfig(), threads: int | None = None,
                      log=print) -> dict:
    """Quality of the quantised export ``export_dir`` against ``reference`` (default: the export it was made from)."""
    t0 = time.perf_counter()
    manifest = Manifest.load(export_dir)
    q = manifest.data.get("quantization")
    if q is None and reference is None:
        raise ValueError(f"{export_dir} is not a quantised export (no `quantization` in its manifest): validate it "
                         "with `dlexport validate`, which compares it with PyTorch")
    reference = Path(reference or q["source_export"])
    if not (reference / "manifest.json").exists():
        raise FileNotFoundError(f"the fp32 export {reference} that {export_dir} was quantised from is gone: pass "
                                "--reference DIR with a copy of it (same fingerprint)")
    ref, cand = ExportStack(reference, threads), ExportStack(export_dir, threads)
    if ref.manifest.fingerprint != cand.manifest.fingerprint:
        raise ValueError(f"{reference} holds model {ref.manifest.fingerprint}, {export_dir} model "
                         f"{cand.manifest.fingerprint}: compare a quantised export with its own source export")
    tokenizer, tok_name = tokenizer_for(ref.manifest)
    if text.eval_seqs * (text.seq_len - 1) < MIN_TOKENS:
        raise ValueError(f"{text.eval_seqs} sequences of {text.seq_len} tokens score fewer than {MIN_TOKENS} tokens: "
                         "ask for more (--eval-seqs, --seq-len)")
    splits = load_splits(tokenizer, {"evaluation": text.eval_seqs}, text.seq_len, text.data or None, text.seed,
                         tok_name)
    ids = splits["evaluation"]

    per_subgraph = []
    with torch.inference_mode():
        hidden, extras = ref.embed(ids)
        hq, extras_q = cand.embed(ids)
        per_subgraph.append({"subgraph": "embed", **_error(hq, hidden)})
        for i in range(ref.num_layers):
            nxt = ref.layer(i, hidden, extras)
            got = cand.layer(i, hidden, extras)
            per_subgraph.append({"subgraph": ref.manifest.layer_key(i), **_error(got, nxt, hidden)})
            hq = cand.layer(i, hq, extras_q)
            hidden = nxt
        rows = ref.rows(ids.shape[0], ids.shape[1])
        head = [_error(cand.logits(hidden[r]), ref.logits(hidden[r])) for r in rows]
        per_subgraph.append({"subgraph": "head", "max_abs_diff": max(h["max_abs_diff"] for h in head),
                             "max_abs_ref": max(h["max_abs_ref"] for h in head),
                             "rel_rms": math.sqrt(sum(h["rel_rms"] ** 2 for h in head) / len(head))})
        ref_top1 = ref.top1(hidden)
        full = ref.score(hidden, ids, ref_top1)
        quant = cand.score(hq, ids, ref_top1)
    report = {
        "reference": str(reference.resolve()),
        "text": splits.describe(),
        "tokens": quant.tokens,
        "perplexity": {"reference": round(full.ppl, 4), "quantized": round(quant.ppl, 4),
                       "ratio": round(quant.ppl / full.ppl, 5)},
        "agreement": round(quant.agreement, 5),
        "subgraphs": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.items()} for s in per_subgraph],
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    worst = max(per_subgraph[1:], key=lambda s: s.get("rel_rms_update", s["rel_rms"]))
    of = "update" if "rel_rms_update" in worst else "output"
    log(f"quantised vs fp32 export on {quant.tokens} held-out tokens ({splits.files} prose files): perplexity "
        f"{quant.ppl:.3f} vs {full.ppl:.3f} ({100 * (quant.ppl / full.ppl - 1):+.2f}%), top-1 agreement "
        f"{quant.agreement:.4f}; worst subgraph {worst['subgraph']}: RMS "
        f"error {worst.get('rel_rms_update', worst['rel_rms']):.3g} of its {of}, max |q - f| "
        f"{worst['max_abs_diff']:.3g} of {worst['max_abs_ref']:.3g}")
    return report


def validate_quantized(export_dir, *, reference=None, text: TextConfig = TextConfig(), threads: int | None = None,
                       log=print) -> dict:
    """``compare_to_source`` recorded in the quantised export's manifest (``quantization.quality``)."""
    manifest = Manifest.load(export_dir)
    if "quantization" not in manifest.data:
        raise ValueError(f"{export_dir} is not a quantised export: `dlexport validate` compares it with PyTorch")
    manifest.verify_files()
    report = compare_to_source(export_dir, reference=reference, text=text, threads=threads, log=log)
    manifest.data["quantization"]["quality"] = report
    manifest.save()
    return report
