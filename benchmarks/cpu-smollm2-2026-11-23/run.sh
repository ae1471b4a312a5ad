#!/usr/bin/env bash
# Reproduces this folder: SmolLM2-135M-Instruct (fp32, 30 layers) on the CPU, 1 thread, prompt 64 / 64 new tokens.
# Run from the repository root after `dlexport export --model smollm2-135m --out exports/smollm2`.
set -euo pipefail
D=$(dirname "$0")

# The 15-layer plan: an uncalibrated speed plan (the first 4 and last 11 layers, the middle dropped); its greedy
# tokens differ from the full model's, which bench.md reports. Speed depends on how many layers run, not which.
python - "$D/plan-15.json" <<'PY'
import sys
from dlexport.manifest import Manifest
from dlexport.runtime import Plan
m = Manifest.load("exports/smollm2")
Plan.skip(m, [0, 1, 2, 3] + list(range(19, 30)), name="drop-middle-15of30").save(sys.argv[1])
PY

dlexport profile exports/smollm2 --tool builtin --contexts 64,128,512,1024 --threads 1 --out "$D/profile.json" \
    > "$D/profile.md"

dlexport bench exports/smollm2 --plan "$D/plan-15.json" --baseline full,hf,onnx-mono --prompt-tokens 64 \
    --new-tokens 64 --threads 1 --repeats 10 --profile "$D/profile.json" --out "$D"
