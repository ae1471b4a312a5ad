#!/usr/bin/env bash
# analyze's speculation section on SmolLM2-135M (in-place KV export, 1 thread), alone so that it fits one quiet run
# (< 3 min with other jobs paused). QUIET: a command prefix that does that (here: /work/notes/quiet.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
EXPORT=${EXPORT:-exports/smollm2}
${QUIET:-} python -c "import sys; from dlexport.cli import main; sys.exit(main())" analyze "$EXPORT" \
    --only speculation --draft-budget 20 --measure-prompts 6 --threads 1 -o benchmarks/analyze-speculation-smollm2-2026-12-02b
