#!/usr/bin/env bash
# The QLoRA demo end to end on the CPU: fetches the demo base model if it is missing
# (SmolLM2-135M-Instruct, Q4_1 GGUF, into ${QLORA_CACHE:-$HOME/.cache/qlora}), builds the
# release binary and runs `qlora train` with no arguments: LoRA training on the built-in
# ADGEN-style data, adapters and log in runs/demo/. Extra arguments go to `qlora train`
# (e.g. `scripts/demo.sh --max_steps 20`).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-demo-model.sh
cargo build --locked --release -p qlora-trainer
exec target/release/qlora train "$@"
