#!/usr/bin/env bash
# Issue 15, 2026-12-02 (second stop): speculation on layer groups with taps, the skip-set search, prompt lookup and
# memory across requests, against plain greedy decoding. 1 thread, other jobs paused.
# usage: bash run.sh EXPORT   (a fused in-place SmolLM2-135M export, e.g. `dlexport export --model smollm2-135m`)
set -euo pipefail
EXPORT=${1:?export folder}
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../.."
[ -d /tmp/dlx/llama-quiet ] || dlexport export --model llama-quiet --random-weights --out /tmp/dlx/llama-quiet
PLAN=$(mktemp -d)/plan.json
dlexport plan calibrate-draft "$EXPORT" -o "$PLAN"   # prefix [0], k 1, 821-token head on SmolLM2
for set in repetitive prose; do
  python3 scripts/speculative_probe_bench.py --export "$EXPORT" --plan "$PLAN" --set $set --prompts 60 \
    --new-tokens 16 --configs plain calibrated calibrated-full-head calibrated+lookup lookup-k8 skip-search \
    --out "$HERE"
done
python3 scripts/speculative_depth_bench.py --smollm2 "$EXPORT" --quiet /tmp/dlx/llama-quiet --out "$HERE/depth" \
  --sections speculative --spec-prompts 4 --quiet-prompts 16 --new-tokens 24 --threads 1
