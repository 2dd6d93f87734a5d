#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls exactly this). Installs what it needs
# only when missing: the wasm32 target (qlora-core must build for the browser) and the demo
# base model (scripts/fetch-demo-model.sh, cached outside the repo).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
if [ -x scripts/fetch-demo-model.sh ]; then
  scripts/fetch-demo-model.sh
fi

# qlora-core is shared with the browser app: it must build for wasm32.
cargo build --locked -p qlora-core --target wasm32-unknown-unknown
cargo test --locked --workspace
