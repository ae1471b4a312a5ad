"""What a quantised export costs in quality, measured against the export it was made from on held-out prose.

Per subgraph: each quantised layer (and the head) gets the fp32 graph's own input on real text and its output is
compared with the fp32 graph's (max |q - f| and relative RMS error): reported, not held to an fp32 tolerance. End to
end: the quantised graphs run the whole text (teacher-forced), giving held-out perplexity next to the fp32 export's
and top-1 agreement with the fp32 model, over at least ``MIN_TOKENS`` predicted tokens. Both sides are scored by
``Stack.score``, the scoring every plan tool uses. ``others`` scores further models on the same tokens from their
logits (e.g. llama.cpp on a GGUF, ``dlexport.tools.llamacpp``).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..manifest import Manifest
from .calibrate import TextConfig
from .stack import ExportStack, Scores
from .text import load_splits, tokenizer_for

MIN_TOKENS = 2000


class _Error:
    """max |q - f| and RMS error of one subgraph's output, accumulated over batches; for a layer also relative to
    what it adds to its input (the residual stream's outliers make a layer's output-relative error look small)."""

    def __init__(self, name: str):
        self.name, self.max_diff, self.max_ref, self.sq = name, 0.0, 0.0, {"diff": 0.0, "ref": 0.0, "update": 0.0}

    def add(self, got: torch.Tensor, ref: torch.Tensor, layer_input: torch.Tensor | None = None) -> None:
        diff = (got - ref).float()
        self.max_diff = max(self.max_diff, float(diff.abs().max()))
        self.max_ref = max(self.max_ref, float(ref.abs().max()))
        self.sq["diff"] += float(diff.square().sum())
        self.sq["ref"] += float(ref.float().square().sum())
        if layer_input is not None:
            self.sq["update"] += float((ref - layer_input).float().square().sum())

    def to_json(self) -> dict:
        out = {"subgraph": self.name, "max_abs_diff": round(self.max_diff, 6), "max_abs_ref": round(self.max_ref, 6),
               "rel_rms": round(math.sqrt(self.sq["diff"] / max(self.sq["ref"], 1e-30)), 6)}
        if self.sq["update"]:
            out["rel_rms_update"] = round(math.sqrt(self.sq["diff"] / self.sq["update"]), 6)
        return out


def _score_logits(logits: torch.Tensor, ids: torch.Tensor, ref_top1: torch.Tensor) -> Scores:
    """``Stack.score`` from logits [batch, tokens, vocab]: perplexity of ``ids[:, 1:]``, agreement with ``ref_top1``."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    targets = ids[:, 1:]
    nll = -logp.gather(-1, targets[..., None]).sum().item()
    agree = (logits[:, :-1].argmax(-1) == ref_top1[:, :-1]).sum().item()
    return Scores(nll / targets.numel(), agree / targets.numel(), targets.numel())


def compare_to_source(export_dir, *, reference=None, text: TextConfig = TextConfig(), threads: int | None = None,
                      batch_seqs: int = 2, others: dict | None = None, log=print) -> dict:
    """Quality of the quantised export ``export_dir`` against ``reference`` (default: the export it was made from).

    ``others``: name -> an object with ``logits(ids [batch, tokens]) -> [batch, tokens, vocab]`` (and optionally an
    ``info`` dict), scored on the same sequences: perplexity and top-1 agreement with the reference."""
    others = others or {}
    t0 = time.perf_counter()
    manifest = Manifest.load(export_dir)
    q = manifest.data.get("quantization")
    if q is None and reference is None:
        raise ValueError(f"{export_dir} is not a quantised export (no `quantization` in its manifest): validate it "
                         "with `dlexport validate`, which compares it with PyTorch")
    reference = Path(reference or q["source_export"])
    if not (reference / "manifest.json").exists():
        raise FileNotFoundError(f"the export {reference} that {export_dir} was quantised from is gone: put it back "
                                "there, or pass compare_to_source(..., reference=DIR) a copy (same fingerprint)")
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

    names = ["embed"] + [ref.manifest.layer_key(i) for i in range(ref.num_layers)] + ["head"]
    errors = {n: _Error(n) for n in names}
    scores = {"reference": [], "quantized": [], **{name: [] for name in others}}
    with torch.inference_mode():  # a few sequences at a time: ONNX Runtime keeps an arena per session and shape
        for b in range(0, ids.shape[0], batch_seqs):
            batch = ids[b:b + batch_seqs]
            hidden, extras = ref.embed(batch)
            hq, extras_q = cand.embed(batch)
            errors["embed"].add(hq, hidden)
            for i in range(ref.num_layers):
                nxt = ref.layer(i, hidden, extras)
                errors[names[i + 1]].add(cand.layer(i, hidden, extras), nxt, hidden)
                hq = cand.layer(i, hq, extras_q)
                hidden = nxt
            errors["head"].add(cand.logits(hidden), ref.logits(hidden))
            ref_top1 = ref.top1(hidden)
            scores["reference"].append(ref.score(hidden, batch, ref_top1))
            scores["quantized"].append(cand.score(hq, batch, ref_top1))
            for name, other in others.items():
                scores[name].append(_score_logits(other.logits(batch), batch, ref_top1))
    total = {name: Scores(sum(s.nll * s.tokens for s in v) / sum(s.tokens for s in v),
                          sum(s.agreement * s.tokens for s in v) / sum(s.tokens for s in v),
                          sum(s.tokens for s in v)) for name, v in scores.items()}
    full, quant = total["reference"], total["quantized"]
    per_subgraph = [e.to_json() for e in errors.values()]
    report = {
        "reference": str(reference.resolve()),
        "text": splits.describe(),
        "tokens": quant.tokens,
        "perplexity": {"reference": round(full.ppl, 4), "quantized": round(quant.ppl, 4),
                       "ratio": round(quant.ppl / full.ppl, 5)},
        "agreement": round(quant.agreement, 5),
        "subgraphs": per_subgraph,
        **({"others": {name: {"perplexity": round(total[name].ppl, 4), "ratio": round(total[name].ppl / full.ppl, 5),
                              "agreement": round(total[name].agreement, 5), **getattr(other, "info", {})}
                       for name, other in others.items()}} if others else {}),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    worst = max(per_subgraph[1:], key=lambda s: s.get("rel_rms_update", s["rel_rms"]))
    of = "update" if "rel_rms_update" in worst else "output"
    log(f"quantised vs fp32 export on {quant.tokens} held-out tokens ({splits.files} prose files): perplexity "
        f"{quant.ppl:.3f} vs {full.ppl:.3f} ({100 * (quant.ppl / full.ppl - 1):+.2f}%), top-1 agreement "
        f"{quant.agreement:.4f}; worst subgraph {worst['subgraph']}: RMS "
        f"error {worst.get('rel_rms_update', worst['rel_rms']):.3g} of its {of}, max |q - f| "
        f"{worst['max_abs_diff']:.3g} of {worst['max_abs_ref']:.3g}")
    for name in others:
        o = total[name]
        log(f"{name} on the same tokens: perplexity {o.ppl:.3f} ({100 * (o.ppl / full.ppl - 1):+.2f}% vs the fp32 "
            f"export), top-1 agreement with it {o.agreement:.4f}")
    return report


def validate_quantized(export_dir, *, reference=None, text: TextConfig = TextConfig(), threads: int | None = None,
                       others: dict | None = None, log=print) -> dict:
    """``compare_to_source`` recorded in the quantised export's manifest (``quantization.quality``)."""
    manifest = Manifest.load(export_dir)
    if "quantization" not in manifest.data:
        raise ValueError(f"{export_dir} is not a quantised export: `dlexport validate` compares it with PyTorch")
    manifest.verify_files()
    report = compare_to_source(export_dir, reference=reference, text=text, threads=threads, others=others, log=log)
    manifest.data["quantization"]["quality"] = report
    manifest.save()
    return report
