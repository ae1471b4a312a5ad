#!/usr/bin/env bash
# Serving SmolLM2-135M fp32 (in-place KV export) through tritonserver on this 2-core CPU machine (issue 13):
# 1/4/16 closed-loop clients, full depth and an evenly spaced 15-layer plan, dynamic batching on vs off (two models
# on one server, interleaved per point). Reproduce from the repository root (after `dlexport serve --prepare-env`):
#   bash benchmarks/serve-smollm2-2026-12-01/run.sh [EXPORT_DIR]
set -euo pipefail
D="$(dirname "$0")"
EXPORT="${1:-exports/smollm2-inplace}"
[ -f "$EXPORT/manifest.json" ] || dlexport export --model smollm2-135m --out "$EXPORT"
# even-15.json: Plan.skip(manifest, range(0, 30, 2), name='even-15'), as in benchmarks/threads-smollm2-2026-12-01
python -m dlexport serve-bench "$EXPORT" --plan "even-15=$D/even-15.json" --clients 1,4,16 \
    --prompt-tokens 32 --new-tokens 16 --out "$D/results"
