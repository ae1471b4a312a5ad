"""export, inspect, validate."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model to per-layer ONNX subgraphs and validate them")
    p.add_argument("--model", default="smollm2-135m",
                   help="HF folder or hub id, a built-in GGUF ('smollm2-135m', 'gemma3-270m'), or a shape name "
                        "with --random-weights")
    p.add_argument("--random-weights", action="store_true", help="build --model's named shape with random weights")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--opset", type=int, default=18, help="opset of the traced graphs (in-place layers use 24)")
    p.add_argument("--kv", default="inplace", choices=["inplace", "portable"],
                   help="inplace: layers update their KV buffer and attend over its filled part (ONNX Runtime, "
                        "TensorRT for RTX); portable: opset-18 layers that return the new key/values (also TensorRT "
                        "10.3 on JetPack 6)")
    p.add_argument("--no-validate", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an export of another model in --out (only the "
                                                            "files dlexport wrote there; nothing else is touched)")
    p.add_argument("--trace-every-layer", action="store_true",
                   help="trace each layer instead of one per layer structure (slower; the files come out the same)")
    p.set_defaults(func=_export, resumable=True)

    p = sub.add_parser("inspect", help="summarise an export or engine folder")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("validate", help="re-run an export's validation against PyTorch")
    p.add_argument("dir", type=Path)
    p.add_argument("--compare-gguf", type=Path, metavar="GGUF",
                   help="a quantised export: also score llama.cpp on this GGUF on the same held-out tokens")
    p.set_defaults(func=_validate)


def _export(args) -> int:
    from ..pipeline import export

    export(args.model, args.out, random_weights=args.random_weights, dtype=args.dtype, opset=args.opset, kv=args.kv,
           validate=not args.no_validate, overwrite=args.overwrite, reuse_traces=not args.trace_every_layer)
    return 0


def _inspect(args) -> int:
    if (args.dir / "engines.json").exists():
        from ..engines.folder import describe_engine_folder

        print(describe_engine_folder(args.dir))
        return 0
    from ..exporter.inspect import describe

    print(describe(args.dir))
    return 0


def _validate(args) -> int:
    from ..exporter.sources import load_source
    from ..validation import validate
    from ..manifest import Manifest

    manifest = Manifest.load(args.dir)
    if "quantization" in manifest.data:  # no PyTorch module holds its weights: measured against its source export
        from ..plans.quality import validate_quantized

        from ..plans.calibrate import TextConfig
        from .quantizing import gguf_scorers

        text = TextConfig()
        validate_quantized(args.dir, text=text, others=gguf_scorers(args.compare_gguf, args.dir, text, None))
        print("validation done (quantised export: errors and quality reported above, no fp32 tolerance applies)")
        return 0
    if args.compare_gguf:
        raise ValueError("--compare-gguf is for a quantised export (its quality check scores llama.cpp alongside)")
    manifest.verify_files()
    dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[manifest.dtype]
    loaded = load_source(manifest.data["source"], dtype=dtype)
    report = validate(manifest, loaded)
    manifest.data["validation"] = report.to_json()
    manifest.save()
    report.raise_if_failed()
    print("validation passed")
    return 0
