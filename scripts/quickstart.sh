#!/usr/bin/env bash
# The main job on the embedded default model: install, export + validate SmolLM2-135M, inspect, and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
dlexport export --model smollm2-135m --out exports/smollm2
dlexport inspect exports/smollm2
dlexport run exports/smollm2 --prompt "The three most important rules of writing software are" --max-new-tokens 32
