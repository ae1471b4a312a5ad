#!/usr/bin/env bash
# Issue 15 measurements (SmolLM2-135M, in-place KV export, 1 thread). The draft plan and its head (an ONNX file,
# not committed) are made by calibrate-draft into $PLAN_DIR; each timing run is one interleaved run < 3 min.
# QUIET: a command prefix that keeps other jobs off the CPU while timing (here: /work/notes/quiet.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
EXPORT=${EXPORT:-exports/smollm2}
PLAN_DIR=${PLAN_DIR:-/tmp/spec/smolplan2}
OUT=benchmarks/speculative-2026-12-01
export PYTHONPATH=.
[ -f "$PLAN_DIR/plan.json" ] || python -c "import sys; from dlexport.cli import main; sys.exit(main())" \
    plan calibrate-draft "$EXPORT" -o "$PLAN_DIR/plan.json" --budget-s 90 --threads 1
cp "$PLAN_DIR/plan.json" "$OUT/draft-plan.json"
${QUIET:-} python scripts/speculative_probe_bench.py --export "$EXPORT" --plan "$PLAN_DIR/plan.json" \
    --set prose --prompts 60 --new-tokens 16 --configs plain calibrated prefix12-full-head --out "$OUT"
${QUIET:-} python scripts/speculative_probe_bench.py --export "$EXPORT" --plan "$PLAN_DIR/plan.json" \
    --set repetitive --prompts 16 --new-tokens 24 \
    --configs plain calibrated prefix12-cheap-head prefix12-full-head --out "$OUT"
