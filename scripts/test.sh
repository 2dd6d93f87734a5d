#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls exactly this). Installs what it needs
# only when missing: the wasm32 target (qlora-core must build for the browser), the demo base
# model (scripts/fetch-demo-model.sh, cached outside the repo) and cargo-fuzz (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
scripts/fetch-demo-model.sh

# qlora-core is shared with the browser app: it must build for wasm32.
cargo build --locked -p qlora-core --target wasm32-unknown-unknown
# Every parser of downloaded files under libFuzzer for a few seconds each (fuzz/).
scripts/fuzz.sh 5
# Last, so the test runner's summary closes the log: nextest (on this project's machines) ends
# with one line for the whole suite; cargo test is the fallback.
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --locked --workspace --no-fail-fast
else
  cargo test --locked --workspace
fi
