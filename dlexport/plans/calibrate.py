"""`plan calibrate`: a static skip plan (and its ladder) chosen by greedy removal, judged on held-out text."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import integer, number
from ..errors import InputError
from ..files import Journal, OwnedFolder, check_replaceable
from ..manifest import Manifest, model_fingerprint
from ..runtime.plan import FORMAT as PLAN_FORMAT
from ..runtime.plan import Plan
from .greedy import GreedyRemoval, even_layers, evaluate
from .stack import Stack, vocab_subset
from .text import load_splits, tokenizer_for


@dataclass
class TextConfig:
    """How much text each job reads: sequences of ``seq_len`` tokens per split."""

    seq_len: int = 128
    calib_seqs: int = 8
    eval_seqs: int = 16
    data: tuple = ()  # files or folders; empty: prose on this machine
    seed: int = 0

    def __post_init__(self):
        integer(self.seq_len, "--seq-len", 2, 1 << 16)
        integer(self.calib_seqs, "--calib-seqs", 1, 1 << 20)
        integer(self.eval_seqs, "--eval-seqs", 1, 1 << 20)
        integer(self.seed, "seed", 0, None)

    def sizes(self, **extra) -> dict[str, int]:
        return {"calibration": self.calib_seqs, "evaluation": self.eval_seqs, **extra}


@dataclass
class Opened:
    manifest: Manifest
    loaded: object
    stack: Stack
    tokenizer: object
    tokenizer_name: str


def open_export(export_dir, loaded=None) -> Opened:
    """The export's manifest plus the PyTorch model it came from, refusing a model with another fingerprint."""
    from ..exporter.sources import load_source

    manifest = Manifest.load(export_dir)
    loaded = loaded or load_source(manifest.data["source"])
    fp = model_fingerprint(loaded.model)
    if fp != manifest.fingerprint:
        raise InputError(f"the model loaded from source {manifest.data['source']!r} has fingerprint {fp}, but "
                         f"{export_dir} was exported from fingerprint {manifest.fingerprint}: the source changed "
                         "since the export; re-export it so that plans match the engines")
    tokenizer, name = tokenizer_for(manifest, loaded)
    return Opened(manifest, loaded, Stack(loaded.model), tokenizer, name)


def _journal_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.progress.json")


class _Steps:
    """Finished expensive steps of a calibration (tensors in a folder next to the plan), for resuming."""

    def __init__(self, out: Path, identity: dict):
        self.folder = out.with_name(f".{out.name}.steps")
        self.journal = Journal(_journal_path(out), identity)

    def get(self, name: str, compute):
        path = self.folder / f"{name}.pt"
        if self.journal.get(name) and path.exists():
            return torch.load(path)
        value = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        torch.save(value, tmp)
        tmp.replace(path)
        self.journal.record(name, {"file": path.name})
        return value

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.journal.remove()


def target_depth(num_layers: int, target_layers: int | None, target_fraction: float | None) -> int:
    if (target_layers is None) == (target_fraction is None):
        raise InputError("give exactly one of --target-layers K or --target-fraction F")
    k = target_layers if target_layers is not None else round(target_fraction * num_layers)
    if not 1 <= k <= num_layers:
        raise InputError(f"target of {k} layers is outside 1..{num_layers} for this model: pick a depth in range")
    return k


def calibrate_skip(export_dir, out, *, target_layers: int | None = None, target_fraction: float | None = None,
                   metric: str = "ppl", text: TextConfig = TextConfig(), rescore: int | None = None,
                   vocab_top_k: int = 16, loaded=None, progress: bool = True, on_step=None, log=print) -> Plan:
    """Greedy removal on the calibration split down to one layer; the plan keeps ``K`` layers, the ladder all.

    ``rescore``: after the first (exhaustive) step, re-score only the M removals that were least harmful when last
    scored (stale scores rank the rest); None picks 6 for deep models (30 layers: ~4x fewer layer runs) and exact
    greedy below 13 layers. The plan records the model fingerprint, the text and every score it was chosen on.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_replaceable(out, PLAN_FORMAT, "-o")
    o = open_export(export_dir, loaded)
    n = o.stack.num_layers
    k = target_depth(n, target_layers, target_fraction)
    rescore = (6 if n > 12 else 0) if rescore is None else rescore
    splits = load_splits(o.tokenizer, text.sizes(), text.seq_len, text.data or None, text.seed, o.tokenizer_name)
    ids = splits["calibration"]
    identity = {"fingerprint": o.manifest.fingerprint, "text": splits.digest, "metric": metric,
                "rescore": rescore, "vocab_top_k": vocab_top_k}
    journal = Journal(_journal_path(out), identity)
    with torch.inference_mode():
        emb, extras = o.stack.embed(ids)
        final = o.stack.run(emb, extras, range(n))
        vocab = vocab_subset(o.stack, final, ids, vocab_top_k)
    greedy = GreedyRemoval(o.stack, ids, metric, rescore, vocab)
    greedy.run(journal, progress, on_step)
    ladder = greedy.ladder()
    layers = ladder[k - 1]
    sets = {"full": tuple(range(n)), "greedy": layers, "even": even_layers(n, k)}
    held, _ = evaluate(o.stack, splits["evaluation"], sets, progress=progress)
    calibration = {
        "method": "greedy-removal", "metric": metric, "target_layers": k, "rescore": rescore,
        "vocab_subset": {"top_k": vocab_top_k, "size": int(vocab.numel())},
        "text": {**splits.describe(), "sources": [str(p) for p in text.data] or "machine prose"},
        "calibration_split": {"full": greedy.full.to_json(), "steps": [s.to_json() for s in greedy.steps]},
        "held_out": {name: {"layers": len(sets[name]), **s.to_json()} for name, s in held.items()},
        "even_layers": list(sets["even"]),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    plan = Plan.skip(o.manifest, layers, ladder=ladder, name=f"greedy-{k}of{n}", calibration=calibration)
    plan.save(out)
    journal.remove()
    h = calibration["held_out"]
    log(f"plan {out}: {k}/{n} layers {list(layers)}\n  held-out ({h['full']['tokens']} tokens): full ppl "
        f"{h['full']['ppl']:.1f}; greedy ppl {h['greedy']['ppl']:.1f} agreement {h['greedy']['agreement']:.3f}; "
        f"evenly spaced ppl {h['even']['ppl']:.1f} agreement {h['even']['agreement']:.3f} "
        f"({calibration['wall_s']:.0f} s)")
    return plan


def calibrate_exit(export_dir, out, *, target_agreement: float, text: TextConfig = TextConfig(),
                   adapters: bool = False, adapter_seqs: int = 64, ridge: float = 0.02, max_exits: int = 6,
                   profile=None, head_cost: float | None = None, loaded=None, progress: bool = True,
                   log=print) -> Plan:
    """Exit layers, criterion and threshold of least expected cost at ``target_agreement`` with the full model.

    Candidates are fitted on the calibration split and reported on the held-out split too. "No exit" is always a
    candidate: when every policy costs more than the full model (head checks included), the plan has no exit and
    says so. ``head_cost`` (in layers) overrides the cost model, e.g. to study a cheaper head.
    """
    from .adapters import ExitAdapter, adapter_file, export_adapter, fit_adapters
    from .costs import Costs, costs_for
    from .exits import FEATURES, Signals, collect_signals, search
    from .exits import evaluate as evaluate_policy
    from ..runtime.plan import AdapterRef, ExitPolicy

    t0 = time.perf_counter()
    out = Path(out)
    number(target_agreement, "--target-agreement", 0.0, 1.0, lo_open=True)
    check_replaceable(out, PLAN_FORMAT, "-o")
    o = open_export(export_dir, loaded)
    n = o.stack.num_layers
    costs, note = costs_for(export_dir, o.stack, profile)
    if head_cost is not None:
        costs, note = Costs(1.0, head_cost, "layer", f"given: head = {head_cost} layers"), ""
    if note:
        log(note)
    sizes = text.sizes(adapter=adapter_seqs) if adapters else text.sizes()
    splits = load_splits(o.tokenizer, sizes, text.seq_len, text.data or None, text.seed, o.tokenizer_name)
    identity = {"fingerprint": o.manifest.fingerprint, "text": splits.digest, "adapters": adapters, "ridge": ridge}
    steps = _Steps(out, identity)
    fitted = None
    if adapters:
        weights = steps.get("adapters", lambda: {i: (a.weight.data, a.bias.data) for i, a in
                                                 fit_adapters(o.stack, splits["adapter"], range(n - 1), ridge,
                                                              progress).items()})
        fitted = {i: ExitAdapter(w, b) for i, (w, b) in weights.items()}
    calib = Signals(**steps.get("signals_calibration", lambda: vars(
        collect_signals(o.stack, splits["calibration"], fitted, progress))))
    held = Signals(**steps.get("signals_evaluation", lambda: vars(
        collect_signals(o.stack, splits["evaluation"], fitted, progress))))
    found = search(calib, costs, target_agreement, max_exits=max_exits)
    best = min((p for p in found.values() if p is not None), key=lambda p: p.cost)
    exit_policy, refs = None, ()
    if best.layers:
        if fitted:
            own = OwnedFolder.claim(out.parent / "adapters", "exit adapters", o.manifest.fingerprint,
                                    overwrite=None, inputs=[export_dir], what="the adapters folder")
            own.add(*(Path(adapter_file(i)).name for i in best.layers))
            refs = tuple(AdapterRef(**export_adapter(o.stack, fitted[i], i, out.parent)) for i in best.layers)
        w, b = best.classifier or ((), 0.0)
        exit_policy = ExitPolicy(best.layers, best.criterion, best.threshold,
                                 features=FEATURES if best.classifier else (), weights=tuple(w),
                                 bias=b, adapters=refs)
    calibration = {
        "method": "exit-policy-search", "target_agreement": target_agreement, "adapters": bool(adapters),
        "costs": costs.to_json(), "cost_note": note,
        "chosen": best.criterion, "pays": best.speedup > 1.0,
        "calibration_split": {k: v.to_json() for k, v in found.items() if v is not None},
        "held_out": {k: evaluate_policy(v, held, costs).to_json() for k, v in found.items() if v is not None},
        "per_layer_agreement": {"calibration": [round(float(a), 4) for a in calib.agree.float().mean(1)],
                                "held_out": [round(float(a), 4) for a in held.agree.float().mean(1)]},
        "text": {**splits.describe(), "sources": [str(p) for p in text.data] or "machine prose"},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    name = f"exit-{best.criterion}-{target_agreement:g}" if best.layers else "full (early exit does not pay)"
    plan = Plan.skip(o.manifest, range(n), exit=exit_policy, name=name, calibration=calibration)
    plan.save(out)
    steps.remove()
    h = calibration["held_out"][best.criterion]
    if best.layers:
        log(f"plan {out}: exit after layers {list(best.layers)} on {best.criterion} >= {best.threshold:.4g}"
            f"{' with adapters' if refs else ''}: calibration agreement {best.agreement:.3f}, held-out "
            f"{h['agreement']:.3f}; predicted speedup {best.speedup:.2f}x ({calibration['wall_s']:.0f} s)")
    else:
        log(f"plan {out}: no exit policy reaches agreement {target_agreement} at less than the full model's cost "
            f"(a head check costs {costs.head_in_layers:.1f} layers): early exit does not pay; the plan runs every "
            "layer")
    return plan
