#!/usr/bin/env bash
# Issue 10 on the final decode core: stitched full depth (in-place KV layers, grouped-query attention without
# repeat_kv's Expand) against dlexport's monolithic ONNX graph of the same model, SmolLM2-135M fp32, CPU, 1 thread,
# interleaved rounds, at prompt 64 / 64 new and prompt 1024 / 128 new; then the share of decode outside engine calls.
# From the repository root: bash benchmarks/cpu-smollm2-decode-core-2026-12-02/run.sh [EXPORT_DIR]
set -euo pipefail
D="$(dirname "$0")"
EXPORT="${1:-exports/smollm2}"
[ -f "$EXPORT/manifest.json" ] || dlexport export --model smollm2-135m --out "$EXPORT"
dlexport bench "$EXPORT" --baseline full,onnx-mono --threads 1 --prompt-tokens 64 --new-tokens 64 --repeats 8 \
    --out "$D/p64-n64"
dlexport bench "$EXPORT" --baseline full,onnx-mono --threads 1 --prompt-tokens 1024 --new-tokens 128 --repeats 4 \
    --prompts 2 --out "$D/p1024-n128"
python "$D/../cpu-smollm2-inplace-2026-12-01/outside.py" "$EXPORT" | tee "$D/outside.txt"
