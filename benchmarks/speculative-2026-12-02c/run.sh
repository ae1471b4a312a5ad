#!/usr/bin/env bash
# Issue 15, 2026-12-02 (third stop): the synthetic best case and SmolLM2's fixed drafts with decode-phase ratios and
# the speedup attainable with the measured cost of a (k+1)-position pass. 1 thread, nothing else running.
# usage: bash run.sh EXPORT   (a fused in-place SmolLM2-135M export, e.g. `dlexport export --model smollm2-135m`)
set -euo pipefail
EXPORT=${1:?export folder}
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../.."
[ -d /tmp/dlx/llama-quiet ] || dlexport export --model llama-quiet --random-weights --out /tmp/dlx/llama-quiet
python3 scripts/speculative_depth_bench.py --smollm2 "$EXPORT" --quiet /tmp/dlx/llama-quiet --out "$HERE/depth" \
  --sections speculative --spec-prompts 4 --quiet-prompts 16 --new-tokens 48 --threads 1
python3 "$HERE/passcost.py" /tmp/dlx/llama-quiet 1,2,3,4,5,6,7,8,9 40 | tee "$HERE/passcost-llama-quiet.txt"
python3 "$HERE/passcost.py" "$EXPORT" 1,2,3,5,9 20 | tee "$HERE/passcost-smollm2.txt"
