"""plan calibrate, plan calibrate-exit, analyze: plans chosen from data."""
from __future__ import annotations

from pathlib import Path


def _text_args(p, calib=8, evals=16) -> None:
    p.add_argument("--data", type=Path, nargs="+", default=[],
                   help="text files or folders (default: prose on this machine, /usr/share/common-licenses and "
                        "/usr/share/doc)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--calib-seqs", type=int, default=calib, help="sequences in the calibration split")
    p.add_argument("--eval-seqs", type=int, default=evals, help="sequences in the held-out split")
    p.add_argument("--threads", type=int, help="CPU threads (default: every core this process may use; see engines/threads.py)")
    p.add_argument("--no-progress", action="store_true")


def _text(args):
    from ..engines.threads import use_threads
    from ..plans.calibrate import TextConfig

    use_threads(args.threads)
    return TextConfig(args.seq_len, args.calib_seqs, args.eval_seqs, tuple(args.data))


def register(sub) -> None:
    plan = sub.add_parser("plan", help="choose plans from calibration text").add_subparsers(dest="plan_command",
                                                                                           required=True)
    p = plan.add_parser("calibrate", help="static skip plan by greedy layer removal, plus the ladder of all depths")
    p.add_argument("dir", type=Path, help="export folder")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-layers", type=int, help="layers the plan keeps")
    g.add_argument("--target-fraction", type=float, help="fraction of the layers the plan keeps")
    p.add_argument("--metric", choices=["ppl", "agreement"], default="ppl")
    p.add_argument("--rescore", type=int, help="re-score only this many candidates per step after the first "
                                               "(0: exact greedy; default 6 for models deeper than 12 layers)")
    p.add_argument("-o", "--out", type=Path, required=True, help="plan.json to write")
    _text_args(p)
    p.set_defaults(func=_calibrate, resumable=True)

    p = plan.add_parser("calibrate-exit", help="early-exit policy (layers, criterion, threshold) at a target "
                                              "agreement with the full model, head checks counted")
    p.add_argument("dir", type=Path, help="export folder")
    p.add_argument("--target-agreement", type=float, required=True, help="e.g. 0.9")
    p.add_argument("--adapters", action="store_true", help="fit calibrated exit heads (ONNX adapters next to the plan)")
    p.add_argument("--adapter-seqs", type=int, default=64, help="sequences the adapters are fitted on")
    p.add_argument("--profile", type=Path, help="cost table (default: DIR/profile.json; else estimated from weights)")
    p.add_argument("--head-cost", type=float, help="override: one head call costs this many layers")
    p.add_argument("-o", "--out", type=Path, required=True, help="plan.json to write")
    _text_args(p)
    p.set_defaults(func=_calibrate_exit, resumable=True)

    p = plan.add_parser("calibrate-draft", help="self-speculative draft layers and a cheap draft head (the exit "
                                               "head over the vocabulary that covers the model's greedy choices)")
    p.add_argument("dir", type=Path, help="export folder")
    p.add_argument("--coverage", type=float, default=0.99, help="share of the full model's greedy choices on the "
                                                                "calibration text the draft head's vocabulary covers")
    p.add_argument("--k", type=int, default=4, help="most tokens drafted per round")
    p.add_argument("--budget-s", type=float, default=120.0, help="seconds for the skip-set search (prefixes are "
                                                                 "always scored)")
    p.add_argument("--search-seqs", type=int, default=2, help="calibration sequences each skip set is scored on")
    p.add_argument("-o", "--out", type=Path, required=True, help="plan.json to write (the head goes to draft/ next "
                                                                 "to it)")
    _text_args(p, calib=32)
    p.set_defaults(func=_calibrate_draft)

    p = sub.add_parser("analyze", help="report what skip plans, early exit and per-sequence depth buy on a model")
    p.add_argument("dir", type=Path, help="export folder")
    p.add_argument("--plan", type=Path, help="a plan with a ladder from `plan calibrate` on this model, reused "
                                             "instead of running greedy removal again")
    p.add_argument("--adapter-seqs", type=int, default=64)
    p.add_argument("--profile", type=Path, help="cost table (default: DIR/profile.json; else estimated from weights)")
    p.add_argument("--draft-budget", type=float, default=60.0, help="seconds for the self-speculation draft's "
                                                                    "skip-set search (prefixes are always scored)")
    p.add_argument("--draft-seqs", type=int, default=32, help="fitting sequences the draft search reads")
    p.add_argument("--no-measure", action="store_true", help="predict self-speculation's speedup only; skip its "
                                                             "timed run")
    p.add_argument("--measure-prompts", type=int, default=4, help="held-out prompts per text kind in the timed run")
    p.add_argument("--measure-tokens", type=int, default=32, help="new tokens per prompt in the timed run")
    p.add_argument("--only", choices=["speculation"], help="run only this section (e.g. its timed run on a quiet "
                                                           "machine)")
    p.add_argument("-o", "--out", type=Path, required=True, help="report folder")
    _text_args(p)
    p.set_defaults(func=_analyze, resumable=True)


def _calibrate(args) -> int:
    from ..plans.calibrate import calibrate_skip

    calibrate_skip(args.dir, args.out, target_layers=args.target_layers, target_fraction=args.target_fraction,
                   metric=args.metric, text=_text(args), rescore=args.rescore, progress=not args.no_progress)
    return 0


def _calibrate_exit(args) -> int:
    from ..plans.calibrate import calibrate_exit

    calibrate_exit(args.dir, args.out, target_agreement=args.target_agreement, text=_text(args),
                   adapters=args.adapters, adapter_seqs=args.adapter_seqs, profile=args.profile,
                   head_cost=args.head_cost, progress=not args.no_progress)
    return 0


def _calibrate_draft(args) -> int:
    from ..plans.draft import calibrate_draft

    calibrate_draft(args.dir, args.out, coverage=args.coverage, k=args.k, budget_s=args.budget_s, text=_text(args),
                    search_seqs=args.search_seqs, progress=not args.no_progress)
    return 0


def _analyze(args) -> int:
    from ..plans.analyze import analyze

    analyze(args.dir, args.out, text=_text(args), ladder_plan=args.plan, adapter_seqs=args.adapter_seqs,
            profile=args.profile, draft_budget_s=args.draft_budget, draft_seqs=args.draft_seqs,
            measure=not args.no_measure, measure_prompts=args.measure_prompts, measure_tokens=args.measure_tokens,
            only=args.only, threads=args.threads, progress=not args.no_progress)
    return 0
