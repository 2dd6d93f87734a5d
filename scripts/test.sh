#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls exactly this). Installs what it needs
# only when missing: the wasm32 target (qlora-core must build for the browser), the demo base
# model (scripts/fetch-demo-model.sh, cached outside the repo), cargo-fuzz (scripts/fuzz.sh),
# Mesa's software Vulkan driver (the WGSL engine's tests run on it) and the browser app's
# tools (trunk, wasm-bindgen-cli, wasm-opt, Chromium, chromedriver), and NVRTC with the CUDA
# headers (pip wheels) for the CUDA kernels' compile test.
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser app (web/) is built with trunk from local, version-pinned tools, and its test
# drives headless Chromium (native-trainer/tests/inspector_page.rs). Each tool is installed
# only when missing or of another version.
TRUNK_VERSION=0.21.14
WASM_BINDGEN_VERSION=0.2.130 # = the wasm-bindgen crate pinned in Cargo.toml
BINARYEN_VERSION=132         # Debian's binaryen 108 writes a broken module
TOOLS_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/qlora-tools"

ensure_chromium() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then return; fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: chromium/chromedriver missing and not root: the browser test will skip" >&2
    return
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
}

ensure_trunk() {
  if [ "$(trunk --version 2>/dev/null)" = "trunk $TRUNK_VERSION" ]; then return; fi
  cargo install trunk --locked --version "$TRUNK_VERSION"
}

ensure_wasm_bindgen() {
  if [ "$(wasm-bindgen --version 2>/dev/null)" = "wasm-bindgen $WASM_BINDGEN_VERSION" ]; then return; fi
  # Not --locked: its lock file names a webpki-roots version the registry no longer has.
  cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
}

ensure_wasm_opt() {
  local bin="$TOOLS_CACHE/binaryen-$BINARYEN_VERSION/node_modules/.bin"
  if [ ! -x "$bin/wasm-opt" ]; then
    npm install --silent --no-save --prefix "$TOOLS_CACHE/binaryen-$BINARYEN_VERSION" \
      "binaryen@$BINARYEN_VERSION"
  fi
  export PATH="$bin:$PATH"
}

# The release build the README documents; the browser test serves this very build.
build_web() {
  (cd web && trunk build --release)
  export QLORA_WEB_DIST="$PWD/web/dist"
}

# NVRTC and the CUDA headers (pip wheels, no driver or GPU): the CUDA kernels' compile test
# (kernels/src/compile.rs) then compiles every kernel for sm_90 on a machine without a GPU.
NVRTC_VERSION=13.0.88
CUDA_RUNTIME_VERSION=13.0.96
ensure_nvrtc() {
  local dir="$TOOLS_CACHE/cuda-nvrtc-$NVRTC_VERSION"
  if [ ! -f "$dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
    local wheels
    wheels="$(mktemp -d)"
    pip download --quiet --no-deps --dest "$wheels" \
      "nvidia-cuda-nvrtc==$NVRTC_VERSION" "nvidia-cuda-runtime==$CUDA_RUNTIME_VERSION"
    mkdir -p "$dir.tmp"
    for wheel in "$wheels"/*.whl; do python3 -m zipfile -e "$wheel" "$dir.tmp"; done
    rm -rf "$wheels" "$dir"
    mv "$dir.tmp" "$dir"
  fi
  export LD_LIBRARY_PATH="$dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export CUDA_HOME="$dir/nvidia/cu13"
}

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

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
scripts/fetch-demo-model.sh
ensure_chromium
ensure_trunk
ensure_wasm_bindgen
ensure_wasm_opt
ensure_lavapipe
ensure_nvrtc

# qlora-core is shared with the browser app: it must build for wasm32.
cargo build --locked -p qlora-core --target wasm32-unknown-unknown
# So must the WGSL engine (the browser app runs on it).
cargo build --locked -p qlora-shaders --target wasm32-unknown-unknown
build_web
# Every parser of downloaded files under libFuzzer for a few seconds each (fuzz/).
scripts/fuzz.sh 5
# Last, so the test runner's summary closes the log: nextest (on this project's machines) ends
# with one line for the whole suite; cargo test is the fallback.
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --locked --workspace --no-fail-fast
else
  cargo test --locked --workspace
fi
