#!/usr/bin/env bash
# qlora's CUDA QLoRA training against the reference stack (transformers + peft + bitsandbytes,
# ../shared/anchors/hf_qlora_bench.py) on the same card, one after the other in one session:
# BLOOM-7b1 shapes, random weights, nf4 + double quant, LoRA r=16 alpha=32 on query_key_value,
# bf16; configs 4x128 with and without gradient checkpointing, 1x512 and 16x128 with it.
#
# Usage, from the repository root on the GPU machine:
#   QLORA=<qlora binary> ANCHOR=<hf_qlora_bench.py> RESULTS=<dir> bench/train/run.sh
# The reference stack needs torch + transformers on the machine and bitsandbytes + peft on
# PYTHONPATH (see shared/NOTES.md: .anchor-site).
set -euo pipefail
QLORA=${QLORA:-target/release/qlora}
ANCHOR=${ANCHOR:-../shared/anchors/hf_qlora_bench.py}
RESULTS=${RESULTS:-bench/train/results}
CONFIGS=${CONFIGS:-4x128:gc,4x128:nogc,1x512:gc,16x128:gc}
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/card.txt"
date -u +%Y-%m-%dT%H:%M:%SZ | tee "$RESULTS/date.txt"
"$QLORA" bench train --configs "$CONFIGS" --out "$RESULTS/qlora_bench.json"
OUT="$RESULTS" PYTHONUNBUFFERED=1 python3 "$ANCHOR" --configs "$CONFIGS"
