#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls exactly this). Installs what it needs
# only when missing: the wasm32 target (qlora-core must build for the browser), the demo base
# model (scripts/fetch-demo-model.sh, cached outside the repo), cargo-fuzz (scripts/fuzz.sh) and
# Mesa's software Vulkan driver (the WGSL engine's tests run on it).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
scripts/fetch-demo-model.sh

# lavapipe: the WebGPU adapter of qlora-shaders' tests (they skip only where no adapter exists).
ensure_lavapipe() {
  if dpkg -s mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1; then
    return
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
    mesa-vulkan-drivers libvulkan1
}
ensure_lavapipe

# qlora-core is shared with the browser app: it must build for wasm32.
cargo build --locked -p qlora-core --target wasm32-unknown-unknown
# So must the WGSL engine (the browser app runs on it).
cargo build --locked -p qlora-shaders --target wasm32-unknown-unknown
# Every parser of downloaded files under libFuzzer for a few seconds each (fuzz/).
scripts/fuzz.sh 5
# Last, so the test runner's summary closes the log: nextest (on this project's machines) ends
# with one line for the whole suite; cargo test is the fallback.
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --locked --workspace --no-fail-fast
else
  cargo test --locked --workspace
fi
