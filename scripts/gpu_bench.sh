#!/usr/bin/env bash
# GPU benchmark: the opt-1.3b shape (24 layers) with random fp16 weights on one GPU (written for an H100) through
# ONNX Runtime's CUDA provider: the full model and a 12-of-24-layer plan against Hugging Face `generate` on the
# same weights and against one monolithic ONNX graph, interleaved in one process (`dlexport bench`), plus the
# per-engine cost table (`dlexport profile`, builtin; trtexec too where TensorRT is installed).
#
# NOT RUN YET: this script was written in a session without a GPU, so no GPU results are committed. Run it on the
# GPU machine from the repository root:
#
#     pip install -e '.[gpu]'          # onnxruntime-gpu matching the machine's CUDA
#     bash scripts/gpu_bench.sh [OUT_DIR]
#
# Random weights make the greedy tokens meaningless but the speed real (same shapes, same kernels). In fp16 the
# greedy tokens of ONNX Runtime and PyTorch may diverge after a near-tie; bench.md reports their agreement.
set -euo pipefail

OUT=${1:-benchmarks/gpu-opt1.3b-$(date -u +%Y-%m-%d)}
EXPORT=${EXPORT:-exports/opt-1.3b-fp16}
PROMPT_TOKENS=${PROMPT_TOKENS:-128}
NEW_TOKENS=${NEW_TOKENS:-128}
REPEATS=${REPEATS:-10}

python - <<'PY'
import sys
import onnxruntime as ort
import torch
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("ONNX Runtime has no CUDAExecutionProvider here: pip install -e '.[gpu]' (onnxruntime-gpu for this CUDA)")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA GPU: the Hugging Face baseline needs a CUDA build of torch")
print("GPU:", torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv

mkdir -p "$OUT"
# An interrupted export resumes; a finished one is reused.
dlexport export --model opt-1.3b --random-weights --dtype fp16 --out "$EXPORT"

python - "$EXPORT" "$OUT/plan-12of24.json" <<'PY'
import sys
from dlexport.manifest import Manifest
from dlexport.runtime import Plan
m = Manifest.load(sys.argv[1])
Plan.skip(m, list(range(0, m.num_layers, 2)), name="every-other-12of24").save(sys.argv[2])
PY

dlexport profile "$EXPORT" --device cuda --contexts 128,256,512,1024 --out "$OUT/profile.json" | tee "$OUT/profile.md"

dlexport bench "$EXPORT" --plan "$OUT/plan-12of24.json" --device cuda --baseline full,hf,onnx-mono \
    --prompt-tokens "$PROMPT_TOKENS" --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" \
    --profile "$OUT/profile.json" --out "$OUT"

if command -v trtexec >/dev/null && python -c "import tensorrt" 2>/dev/null; then
    dlexport build --from-export "$EXPORT" --out "$EXPORT-trt" --backend tensorrt
    dlexport profile "$EXPORT-trt" --tool trtexec --device cuda:0 --contexts 128,256,512,1024 \
        --out "$OUT/profile-trtexec.json" | tee "$OUT/profile-trtexec.md"
else
    echo "trtexec or the tensorrt package is missing: TensorRT engines not profiled" | tee "$OUT/trtexec-not-run.txt"
fi
echo "results in $OUT"
