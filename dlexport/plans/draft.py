"""`plan calibrate-draft`: a self-speculative draft chosen offline, with its cheap draft head.

1. Vocabulary: the tokens that cover ``coverage`` of the full model's greedy choices on the calibration text; the
   exit head cut to them (exporter/draft_head.py) is the draft head, checked against the full head on the subset.
2. Draft layers (Draft & Verify style, bounded time): every prefix of the layers is scored exactly (a prefix draft
   sees the very hidden states the full model computes, so its teacher-forced agreement with the full model's
   greedy token is its acceptance), then greedy removal of single layers from the full stack, scored by the same
   agreement of the remaining layers run alone (an estimate: online, skipped layers' key/values come from
   verification), until ``budget_s`` is spent. Each set is scored by ``expected_speedup`` at its acceptance with
   the best draft length, in layer costs from the exported weight sizes plus the per-call overheads the runtime
   uses; the best set wins. The runtime's online depth search moves a prefix draft from this starting point.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..checks import integer, number
from ..errors import InputError
from ..files import OwnedFolder, check_replaceable, sha256_file
from ..runtime.plan import FORMAT as PLAN_FORMAT
from ..runtime.plan import Draft, DraftHeadRef, Plan
from ..runtime.speculative import (
    DRAFT_OVERHEAD,
    VERIFY_EXTRA,
    expected_speedup,
    subgraph_costs,
)
from .calibrate import TextConfig, open_export
from .text import load_splits

HEAD_FILE = "draft/head_subset.onnx"


def vocabulary(top1: torch.Tensor, coverage: float) -> torch.Tensor:
    """Sorted token ids: the most frequent greedy choices until they cover ``coverage`` of ``top1``."""
    counts = torch.bincount(top1.reshape(-1))
    order = torch.argsort(counts, descending=True, stable=True)
    covered = counts[order].cumsum(0).double() / top1.numel()
    size = int(torch.searchsorted(covered, torch.tensor(coverage, dtype=covered.dtype))) + 1
    return torch.sort(order[:min(size, int((counts > 0).sum()))]).values


class _Scorer:
    """Agreement of a draft's subset-head token with the full model's greedy token, per position."""

    def __init__(self, stack, vocab: torch.Tensor):
        self.stack, self.vocab = stack, vocab
        self.weight = stack.lm_weight()[vocab]
        self.cap = getattr(stack.head_module, "cap", None)

    @torch.inference_mode()
    def top1(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.stack.pre_logits(hidden) @ self.weight.T
        return self.vocab[(self.cap(logits) if self.cap else logits).argmax(-1)]

    def agreement(self, hidden: torch.Tensor, ref: torch.Tensor) -> float:
        return float((self.top1(hidden) == ref).double().mean())


def choose(speedups: dict[tuple[int, ...], float]) -> tuple[int, ...]:
    """The draft layer set to ship, from predicted speedups: the best one; but when none predicts a gain, the best
    prefix. A draft that does not pay runs switched off, probing now and then, and only a prefix draft is probed for
    free (a shadow probe reads the plan's own hidden state); a skip set pays a whole draft token per probe (SmolLM2:
    a 29-layer skip set predicted 0.99x ran 0.93x adaptive in a 4-prompt run; the 1-layer prefix 0.99-1.06x)."""
    top = max(speedups, key=speedups.get)
    if speedups[top] > 1.0:
        return top
    prefixes = [s for s in speedups if s == tuple(range(len(s)))]
    return max(prefixes, key=speedups.get, default=top)


def hidden_states(stack, ids: torch.Tensor) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
    """(embedding, rotary extras, the hidden state after every layer) of whole sequences, teacher-forced."""
    emb, extras = stack.embed(ids)
    h, out = emb, []
    for i in range(stack.num_layers):
        h = stack.layer(i, h, extras)
        out.append(h)
    return emb, extras, out


class DraftSearch:
    """Steps 1-2 of the module docstring on fitting text ``ids`` (shared by `plan calibrate-draft` and `analyze`).

    ``candidates`` maps a layer set to its kind (prefix / skip), acceptance on the fitting text and predicted
    speedup; every prefix is scored on construction, ``remove_layers`` adds skip sets until a deadline.
    """

    def __init__(self, stack, manifest, ids: torch.Tensor, coverage: float, k: int):
        self.stack, self.k, self.n = stack, k, stack.num_layers
        if self.n < 2:
            raise InputError(f"{manifest.data.get('source')} has {self.n} layer: a self-speculative draft needs a "
                             "model of 2 layers or more (it drafts with some of them)")
        self.layer_cost, self.full_head_cost = subgraph_costs(manifest)
        self.plan_cost = sum(self.layer_cost.values()) + self.full_head_cost
        with torch.inference_mode():
            self.emb, self.extras, hs = hidden_states(stack, ids)
            self.ref = stack.top1(hs[-1])
        self.vocab = vocabulary(self.ref, coverage)
        self.scorer = _Scorer(stack, self.vocab)
        self.head_cost = self.full_head_cost * self.vocab.numel() / manifest.arch["vocab_size"]
        self.candidates: dict[tuple[int, ...], dict] = {}
        self.steps = 0
        for depth in range(1, self.n):  # prefixes: exact acceptance
            alpha = self.scorer.agreement(hs[depth - 1], self.ref)
            self.candidates[tuple(range(depth))] = {"kind": "prefix", "acceptance": alpha,
                                                    "speedup": self.score(tuple(range(depth)), alpha)[0]}

    def draft_cost(self, layers) -> float:
        """Layer-units per drafted token: the draft's layers plus the subset head (overheads come on top)."""
        return sum(self.layer_cost[i] for i in layers) + self.head_cost

    def speedup(self, layers, alpha: float, k: int) -> float:
        """Predicted speedup of drafting ``k`` tokens per round with ``layers`` at acceptance ``alpha``."""
        return expected_speedup(k, alpha, self.draft_cost(layers), self.plan_cost, DRAFT_OVERHEAD, VERIFY_EXTRA)

    def score(self, layers, alpha: float) -> tuple[float, int]:
        """(predicted speedup, draft length) at acceptance ``alpha``, with the draft length that maximises it."""
        gain = {m: self.speedup(layers, alpha, m) for m in range(1, self.k + 1)}
        best = max(gain, key=gain.get)
        return gain[best], best

    def remove_layers(self, deadline: float, search_seqs: int, progress: bool = False, log=print) -> None:
        """Greedy single-layer removal from the full stack, each set scored on ``search_seqs`` sequences, until
        ``deadline`` (a ``time.perf_counter()`` value)."""
        current, sub = tuple(range(self.n)), slice(0, search_seqs)
        extras = {k_: v[sub] for k_, v in self.extras.items()}
        while len(current) > 1 and time.perf_counter() < deadline:
            best, complete = None, True
            for drop in current:
                if time.perf_counter() >= deadline:
                    complete = False
                    break
                layers = tuple(i for i in current if i != drop)
                if layers not in self.candidates:
                    with torch.inference_mode():
                        h = self.stack.run(self.emb[sub], extras, layers)
                    alpha = self.scorer.agreement(h, self.ref[sub])
                    self.candidates[layers] = {"kind": "skip", "acceptance": alpha,
                                               "speedup": self.score(layers, alpha)[0]}
                if best is None or self.candidates[layers]["acceptance"] > self.candidates[best]["acceptance"]:
                    best = layers
            if not complete:  # a step cut short would move on from the best of a few: its sets stay candidates
                break
            current, self.steps = best, self.steps + 1
            if progress:
                c = self.candidates[best]
                log(f"  removal step {self.steps}: {len(best)} layers, acceptance {c['acceptance']:.3f}, "
                    f"predicted {c['speedup']:.2f}x")

    def best(self, kind: str | None = None) -> tuple[int, ...] | None:
        """The candidate (of ``kind``, if given) with the best predicted speedup (``choose``'s rule without kind)."""
        if kind is None:
            return choose({s: v["speedup"] for s, v in self.candidates.items()})
        sets = [s for s, v in self.candidates.items() if v["kind"] == kind]
        return max(sets, key=lambda s: self.candidates[s]["speedup"], default=None)

    @torch.inference_mode()
    def rescore(self, ids: torch.Tensor, positions: slice, skip_sets=()) -> dict[tuple[int, ...], float]:
        """Acceptance on other text ``ids`` at ``positions`` of every prefix (one pass) and of ``skip_sets``."""
        emb, extras, hs = hidden_states(self.stack, ids)
        ref = self.stack.top1(hs[-1])[:, positions]
        out = {tuple(range(d)): self.scorer.agreement(hs[d - 1][:, positions], ref) for d in range(1, self.n)}
        for s in skip_sets:
            out[tuple(s)] = self.scorer.agreement(self.stack.run(emb, extras, s)[:, positions], ref)
        return out

    @torch.inference_mode()
    def acceptance(self, layers, ids: torch.Tensor, positions: slice = slice(None),
                   ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(teacher-forced acceptance of the draft ``layers`` on ``ids`` at ``positions``, the draft's hidden
        states, the full model's greedy tokens). A prefix is exact; a skip set is scored as in ``remove_layers``."""
        layers = tuple(layers)
        emb, extras = self.stack.embed(ids)
        h = self.stack.run(emb, extras, layers)
        if layers == tuple(range(len(layers))):
            full = self.stack.run(h, extras, range(len(layers), self.n))
        else:
            full = self.stack.run(emb, extras, range(self.n))
        ref = self.stack.top1(full)
        return self.scorer.agreement(h[:, positions], ref[:, positions]), h, ref


def write_draft_head(export_dir: Path, manifest, vocab: torch.Tensor, folder: Path, hidden: torch.Tensor,
                     threads: int | None = None) -> tuple[DraftHeadRef, float]:
    """Cut the export's head to ``vocab`` into ``folder``/HEAD_FILE, check it on ``hidden`` (ONNX Runtime with
    ``threads``, engines/threads.py); (its ref, max diff)."""
    from ..exporter.draft_head import subset_head

    head_path = Path(folder) / HEAD_FILE
    subset_head(Path(export_dir) / manifest.subgraph("head")["files"][0]["path"], vocab.tolist(), head_path)
    max_diff = check_draft_head(Path(export_dir), manifest, head_path, vocab, hidden, threads)
    return DraftHeadRef(HEAD_FILE, sha256_file(head_path), int(vocab.numel())), max_diff


def calibrate_draft(export_dir, out, *, coverage: float = 0.99, k: int = 4, budget_s: float = 120.0,
                    text: TextConfig = TextConfig(calib_seqs=32), search_seqs: int = 2, loaded=None,
                    progress: bool = True, log=print) -> Plan:
    t0 = time.perf_counter()
    out = Path(out)
    number(coverage, "--coverage", 0.0, 1.0, lo_open=True)
    integer(k, "--k", 1, 32)
    number(budget_s, "--budget-s", 0.0, None)
    integer(search_seqs, "--search-seqs", 1, text.calib_seqs)
    check_replaceable(out, PLAN_FORMAT, "-o")
    o = open_export(export_dir, loaded)
    n = o.stack.num_layers
    splits = load_splits(o.tokenizer, text.sizes(), text.seq_len, text.data or None, text.seed, o.tokenizer_name)
    search = DraftSearch(o.stack, o.manifest, splits["calibration"], coverage, k)
    search.remove_layers(t0 + budget_s, search_seqs, progress, log)
    vocab, head_cost = search.vocab, search.head_cost
    chosen = search.best()
    c = search.candidates[chosen]
    _, draft_k = search.score(chosen, c["acceptance"])
    held_alpha, h_draft, held_ref = search.acceptance(chosen, splits["evaluation"])  # held-out
    held_coverage = float(torch.isin(held_ref, vocab).double().mean())

    own = OwnedFolder.claim(out.parent / "draft", "draft head", o.manifest.fingerprint, overwrite=None,
                            inputs=[export_dir], what="the draft folder")
    own.add(Path(HEAD_FILE).name)
    ref_, max_diff = write_draft_head(Path(export_dir), o.manifest, vocab, out.parent, h_draft[:2])
    candidates = search.candidates
    calibration = {
        "method": "draft-search", "coverage_target": coverage, "budget_s": budget_s,
        "vocabulary": {"tokens": int(vocab.numel()), "of": o.manifest.arch["vocab_size"],
                       "held_out_coverage": round(held_coverage, 4), "head_cost_layers": round(head_cost, 3),
                       "full_head_cost_layers": round(search.full_head_cost, 3),
                       "max_abs_diff_vs_full_head": max_diff},
        "chosen": {"layers": list(chosen), "kind": c["kind"], "k": draft_k,
                   "acceptance_calibration": round(c["acceptance"], 4), "acceptance_held_out": round(held_alpha, 4),
                   "predicted_speedup": round(c["speedup"], 3),
                   "predicted_speedup_held_out": round(search.score(chosen, held_alpha)[0], 3)},
        "prefixes": {str(len(s)): round(v["acceptance"], 4) for s, v in candidates.items() if v["kind"] == "prefix"},
        "removal_steps": search.steps, "skip_sets_scored": sum(v["kind"] == "skip" for v in candidates.values()),
        "best_skip_set": _best(candidates, "skip"),
        "text": {**splits.describe(), "sources": [str(p) for p in text.data] or "machine prose"},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    plan = Plan.skip(o.manifest, range(n), draft=Draft(chosen, draft_k, True, ref_),
                     name=f"draft-{c['kind']}-{len(chosen)}of{n}", calibration=calibration)
    plan.save(out)
    log(f"plan {out}: draft {c['kind']} {list(chosen)} (k {draft_k}) with a {vocab.numel()}-token draft head "
        f"(held-out coverage {held_coverage:.3f}, {head_cost:.2f} layer-units against {search.full_head_cost:.2f}): "
        f"acceptance {c['acceptance']:.3f} (held-out {held_alpha:.3f}), predicted {c['speedup']:.2f}x"
        f"{'' if c['speedup'] > 1 else ' (does not pay: the adaptive policy will keep it off)'} "
        f"({calibration['wall_s']:.0f} s)")
    return plan


def _best(candidates: dict, kind: str) -> dict | None:
    sets = [s for s, v in candidates.items() if v["kind"] == kind]
    if not sets:
        return None
    s = max(sets, key=lambda c: candidates[c]["speedup"])
    return {"layers": list(s), "acceptance": round(candidates[s]["acceptance"], 4),
            "predicted_speedup": round(candidates[s]["speedup"], 3)}


def check_draft_head(export_dir: Path, manifest, head_path: Path, vocab: torch.Tensor, hidden: torch.Tensor,
                     threads: int | None = None) -> float:
    """Run the draft head and the export's head on the same hidden states: the subset's logits must match."""
    from ..contract import TensorSpec
    from ..engines.onnxruntime import OrtConfig, OrtEngine
    from ..validation import ValidationError

    sub = manifest.subgraph("head")
    ins = [TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in sub["inputs"]]
    outs = [TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in sub["outputs"]]
    config = OrtConfig(threads=threads)
    full = OrtEngine("head", Path(export_dir) / sub["files"][0]["path"], ins, outs, config)
    draft = OrtEngine("draft-head", head_path, ins, [TensorSpec("logits", outs[0].shape[:-1] + (int(vocab.numel()),),
                                                                outs[0].dtype)], config)
    dtype = ins[0].dtype
    x = hidden.to(getattr(torch, dtype)).contiguous()
    want = full.run({"hidden_states": x})["logits"][..., vocab].float()
    got = draft.run({"hidden_states": x})["logits"].float()
    diff = float((got - want).abs().max())
    tol = (1e-4 if dtype == "float32" else 1e-2) * max(1.0, float(want.abs().max()))
    if not diff <= tol:
        raise ValidationError(f"the draft head {head_path} differs from the full head on its tokens by {diff:.3g} "
                              f"(tolerance {tol:.3g}): the head graph was not cut as expected; report this")
    return round(diff, 8)
