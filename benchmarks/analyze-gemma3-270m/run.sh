#!/usr/bin/env bash
# What dynamic depth buys on Gemma 3 270M (issue 12), CPU, 1 thread. Reproduce from the repository root:
#   bash benchmarks/analyze-gemma3-270m/run.sh [EXPORT_DIR]
# The cost table (profile.json) is timed with other jobs paused (/work/notes/quiet.sh on the shared machine); the
# rest measures quality, not time. About 40 minutes on a loaded 2-core machine (calibrate 7, analyze 39).
set -euo pipefail
D="$(dirname "$0")"
EXPORT="${1:-exports/gemma3-270m}"
[ -f "$EXPORT/manifest.json" ] || dlexport export --model gemma3-270m --out "$EXPORT"
dlexport profile "$EXPORT" --tool builtin --contexts 128,512 --threads 1         # -> EXPORT/profile.json
dlexport plan calibrate "$EXPORT" --target-layers 12 -o "$D/greedy-12.json" --threads 1
dlexport analyze "$EXPORT" --plan "$D/greedy-12.json" -o "$D" --threads 1
