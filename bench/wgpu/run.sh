#!/usr/bin/env bash
# Batch-1 decoding of BLOOM-7b1 shapes (nf4) through the WGSL engine on Vulkan
# (shaders/examples/decode_speed.rs) and through the CUDA path (`qlora bench generate`), one after
# the other on the same card; the JSONs go to $OUT.
#
# On the GPU machine, from the repository root, with the two binaries in $B (built here:
# `cargo build --release -p qlora-trainer -p qlora-shaders --example decode_speed`) and the
# Vulkan loader's .deb files in .gl/ (the device README says how to fetch them: libvulkan1 and
# the glvnd libraries the NVIDIA ICD needs):  B=<dir> OUT=<dir> bench/wgpu/run.sh
set -u
OUT=${OUT:-bench/wgpu/results}; mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
B=${B:-target/release}
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
for d in /usr/local/nvidia/share/vulkan/icd.d /usr/share/vulkan/icd.d /etc/vulkan/icd.d; do ls $d 2>/dev/null; done
ICD=$(ls /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd*.json /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json 2>/dev/null | head -1)
[ -n "$ICD" ] && export VK_DRIVER_FILES=$ICD; echo "ICD $ICD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u +%Y-%m-%dT%H:%M:%SZ
[ -n "${SKIP_CUDA:-}" ] || { echo "== cuda"; timeout 120 $B/qlora bench generate --layers 30 --prefill_tokens 512 --out $OUT/cuda_decode.json 2>&1 | grep -E "lora=false: (decode|decoding)"; }
# HEAD=f32 keeps the LM head in f32 (default bf16, as the CUDA path); VOCAB=256 leaves out most
# of the head (the layers' cost alone).
echo "== wgpu"; VK_LOADER_DEBUG=error,warn timeout 300 ${DECODE_SPEED:-$B/examples/decode_speed} bloom 4096 30 ${VOCAB:-250684} 64 ${HEAD:-bf16} > $OUT/wgpu_decode.json 2> $OUT/wgpu.err; echo "rc $?"; cat $OUT/wgpu_decode.json; tail -5 $OUT/wgpu.err
