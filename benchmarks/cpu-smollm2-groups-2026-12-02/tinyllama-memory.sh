#!/usr/bin/env bash
# The tinyllama-1.1b shape (random weights): fp32 export and int4 quantisation with peak RSS, then the int4 export's
# load + 16 tokens with layer groups (first load composes the group into the cache, second reuses it) and without.
# From the repository root: bash benchmarks/cpu-smollm2-groups-2026-12-02/tinyllama-memory.sh [OUT_DIR]
set -euo pipefail
OUT="${1:-exports/tinyllama-memory}"
T="/usr/bin/time -v"
$T dlexport export --model tinyllama-1.1b --random-weights --no-validate --out "$OUT/fp32" 2>&1 | grep -E "Elapsed|Maximum resident"
$T dlexport quantize "$OUT/fp32" --out "$OUT/int4" --weights int4 --method rtn --block-size 64 --embed-weights int4 \
    2>&1 | grep -E "Elapsed|Maximum resident"
for groups in True True False; do
  $T python -c "from dlexport.runtime import Runtime; rt = Runtime.load('$OUT/int4', threads=1, groups=$groups); \
print(rt.generate([list(range(1, 33))], 16, stop_tokens=[]).tokens)" 2>&1 | grep -E "Maximum resident|\[\["
done
du -sh "$OUT"/fp32 "$OUT"/fp32/layers "$OUT"/int4 "$OUT"/int4/layers
