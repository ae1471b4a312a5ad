#!/usr/bin/env bash
# Threads sweep, SmolLM2-135M fp32, CPU: full depth and an evenly spaced 15-layer plan at 1 and 2 threads, one
# worker process per thread count, interleaved rounds (issue 16). Reproduce from the repository root:
#   bash benchmarks/threads-smollm2-2026-12-01/run.sh [EXPORT_DIR]
set -euo pipefail
D="$(dirname "$0")"
EXPORT="${1:-exports/smollm2}"
[ -f "$EXPORT/manifest.json" ] || dlexport export --model smollm2-135m --out "$EXPORT"
python -c "from dlexport.manifest import Manifest; from dlexport.runtime import Plan; \
Plan.skip(Manifest.load('$EXPORT'), range(0, 30, 2), name='even-15').save('$D/even-15.json')"
dlexport bench "$EXPORT" --plan "$D/even-15.json" --threads-sweep 1,2 --prompt-tokens 64 --new-tokens 64 \
    --repeats 8 --out "$D"
