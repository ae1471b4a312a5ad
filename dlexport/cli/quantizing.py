"""quantize: a weight-only int4/int8 copy of an export, validated against it."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write a weight-only int4/int8 copy of an export (layers and head)",
                       description="Quantise every MatMul weight of the layers and the exit head block-wise "
                                   "(ONNX Runtime's MatMulNBitsQuantizer), then measure held-out perplexity and "
                                   "top-1 agreement against the source export. The result is an export folder with "
                                   "the same fingerprint: plans made on the source run on it unchanged.")
    p.add_argument("dir", type=Path, help="the (fp32 or fp16) export to quantise")
    p.add_argument("--out", required=True, type=Path, help="the new export folder")
    p.add_argument("--weights", required=True, choices=["int4", "int8"])
    p.add_argument("--head-weights", default="int8", choices=["int4", "int8"],
                   help="the exit head's weights (default int8: the vocabulary matrix is the most sensitive; int4 "
                        "there cost SmolLM2-135M +8.9%% perplexity against +0.2%%)")
    p.add_argument("--embed-weights", default="keep", choices=["keep", "int4"],
                   help="the token embedding table: keep it as exported (default), or int4 rows in blocks "
                        "(ONNX Runtime's GatherBlockQuantized, --format ort only; opt-1.3b's fp32 table is 412 MB)")
    p.add_argument("--method", choices=["hqq", "rtn"],
                   help="hqq: fitted float zero points (default for int4 --format ort); rtn: round to nearest")
    p.add_argument("--format", default="ort", choices=["ort", "qdq"],
                   help="ort: ONNX Runtime's MatMulNBits (CPU/CUDA providers); qdq: DequantizeLinear -> MatMul, "
                        "opset 21, the form TensorRT builds (default: ort)")
    p.add_argument("--block-size", type=int, default=32, help="weights per scale along the input dimension")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric codes without zero points (default: asymmetric for ort, symmetric for qdq)")
    p.add_argument("--accuracy-level", type=int, help="MatMulNBits' activation precision on CPU: 1 fp32, 2 fp16, "
                                                      "3 bf16, 4 int8 (fastest); default unset")
    p.add_argument("--overwrite", action="store_true", help="replace another export in --out")
    p.add_argument("--no-validate", action="store_true", help="skip the perplexity/agreement check")
    p.add_argument("--eval-seqs", type=int, default=16, help="held-out sequences for the check (16 x 128 tokens)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads for the check")
    p.add_argument("--compare-gguf", type=Path, metavar="GGUF",
                   help="also score llama.cpp on this GGUF of the same model on the same held-out tokens (xllamacpp)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_quantize)


def _quantize(args) -> int:
    from ..exporter.quantize import WeightQuant, quantize

    q = WeightQuant(args.weights, args.block_size, args.symmetric, args.accuracy_level, args.format, args.method,
                    args.head_weights, args.embed_weights)
    quantize(args.dir, args.out, q, overwrite=args.overwrite, progress=not args.quiet)
    if not args.no_validate:
        from ..plans.calibrate import TextConfig
        from ..plans.quality import validate_quantized

        text = TextConfig(eval_seqs=args.eval_seqs)
        validate_quantized(args.out, text=text, threads=args.threads,
                           others=gguf_scorers(args.compare_gguf, args.out, text, args.threads))
    elif args.compare_gguf:
        raise ValueError("--compare-gguf scores llama.cpp alongside the quality check: drop --no-validate")
    return 0


def gguf_scorers(gguf, export_dir, text, threads) -> dict:
    """{"llama.cpp NAME.gguf": its scorer} for ``--compare-gguf``, or {} without one."""
    if gguf is None:
        return {}
    from ..manifest import Manifest
    from ..tools.llamacpp import GGUFScorer

    vocab = Manifest.load(export_dir).arch["vocab_size"]
    return {f"llama.cpp {Path(gguf).name}": GGUFScorer(gguf, vocab_size=vocab, threads=threads,
                                                       context=text.seq_len + 8)}
