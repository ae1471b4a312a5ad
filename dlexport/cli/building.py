"""build: compile an export (or a model, exported on the way) into an engine folder for a plan."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("build", help="build one engine per subgraph a plan needs into an engine folder",
                       description="Build TensorRT engines (or ONNX Runtime optimised graphs) for the embedding, the "
                                   "plan's layers and the head. Runtime.load / `dlexport run` take the folder.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model to export first (as for `dlexport export --model`)")
    src.add_argument("--from-export", type=Path, help="an existing export folder")
    p.add_argument("--random-weights", action="store_true", help="with --model: the named shape, random weights")
    p.add_argument("--export-dir", type=Path, help="with --model: where the export goes (default: OUT-export)")
    p.add_argument("--no-validate", action="store_true", help="with --model: skip validating the export")
    p.add_argument("--plan", type=Path, help="plan.json: build only its layers (default: every layer)")
    p.add_argument("--out", required=True, type=Path, help="the engine folder (new, empty, or one built for this model)")
    p.add_argument("--overwrite", action="store_true", help="replace dlexport's files in an engine folder of another "
                                                            "model (files dlexport did not write are kept)")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "tensorrt-rtx", "onnxruntime"],
                   help="auto: TensorRT where it imports and a GPU it supports is present, else ONNX Runtime")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="default: the export's dtype with --from-export, the target preset's with --model")
    trt = p.add_argument_group("TensorRT")
    trt.add_argument("--target", choices=["jetson-orin", "datacenter", "rtx"],
                     help="preset for workspace, optimisation level, precision and shape limits "
                          "(default: datacenter for tensorrt, rtx for tensorrt-rtx)")
    trt.add_argument("--max-batch", type=int)
    trt.add_argument("--max-prompt", type=int, help="longest prompt in one prefill call")
    trt.add_argument("--max-context", type=int, help="largest KV buffer: prompt + new tokens")
    trt.add_argument("--max-decode-tokens", type=int, default=8, help="new tokens per decode call (speculative: k+1)")
    trt.add_argument("--workspace", type=float, dest="workspace_gib", help="builder workspace limit, GiB")
    trt.add_argument("--opt-level", type=int, dest="optimization_level", help="builder optimisation level 0..5")
    trt.add_argument("--compute-capability", action="append", default=[], dest="compute_capabilities",
                     help="TensorRT for RTX target (repeatable, e.g. 8.6); default: 8.0, 8.6, 8.9, 12.x")
    trt.add_argument("--no-shared-timing-cache", action="store_true",
                     help="time every engine's tactics from scratch (for measuring what the shared cache saves)")
    p.add_argument("--device", default="cpu", help="ONNX Runtime: the device the optimised graphs are for")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_build, resumable=True)


def _build(args) -> int:
    from ..engines.build import build_engines
    from ..pipeline import build_from_model

    trt_options = {k: getattr(args, k) for k in ("target", "max_batch", "max_prompt", "max_context",
                                                 "max_decode_tokens", "workspace_gib", "optimization_level")}
    trt_options["compute_capabilities"] = tuple(args.compute_capabilities)
    common = dict(backend=args.backend, precision=args.precision, progress=not args.quiet, overwrite=args.overwrite,
                  share_timing_cache=not args.no_shared_timing_cache, ort_device=args.device)
    if args.from_export:
        from ..manifest import Manifest
        from ..runtime.plan import load_plan

        plan = load_plan(args.plan, Manifest.load(args.from_export)) if args.plan else None
        build_engines(args.from_export, args.out, plan=plan, **common, **trt_options)
    else:
        build_from_model(args.model, args.out, export_dir=args.export_dir, random_weights=args.random_weights,
                         plan_path=args.plan, validate=not args.no_validate, **common, **trt_options)
    return 0
