#!/usr/bin/env bash
# Builds what a GPU machine runs (it has no Rust) and packs it into .cuda-bin/ (git-ignored; name
# it in the device call's `carry`), stripped and gzipped to stay under the carry limit:
#   scripts/gpu/pack.sh            qlora.gz and the CUDA test binaries (t_kernels, t_cuda_golden,
#                                  t_cuda_generate), plus scripts/gpu/run.sh's inputs
#   scripts/gpu/pack.sh --as NAME  only the qlora binary, as qlora_NAME.gz: build another tree
#                                  (a stash, a patch) and compare both in one call
# cudarc loads CUDA dynamically, so nothing of CUDA is needed here.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=""
if [ "${1:-}" = "--as" ]; then name="_${2:?--as needs a name}"; fi
mkdir -p .cuda-bin
pack() { # pack BINARY NAME
  local tmp
  tmp="$(mktemp)"
  strip -o "$tmp" "$1"
  gzip -c "$tmp" > ".cuda-bin/$2.gz.tmp" && mv ".cuda-bin/$2.gz.tmp" ".cuda-bin/$2.gz"
  rm -f "$tmp"
}
cargo build --release --locked -p qlora-trainer
pack target/release/qlora "qlora$name"
if [ -z "$name" ]; then
  # The test binaries' paths, from cargo's own report of what it built.
  cargo test --release --locked --no-run -p qlora-kernels -p qlora-trainer \
      --test kernels --test cuda_golden --test cuda_generate --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' |
    while read -r test executable; do pack "$executable" "t_$test"; done
fi
ls -l .cuda-bin
