#!/usr/bin/env bash
# qlora's CUDA 4-bit generation against the reference stack (transformers + bitsandbytes) on the
# same card, one after the other in one session: BLOOM-7b1 shapes, random weights, nf4 + double
# quant, bf16. Batch-1 greedy decoding (as shared/anchors/hf_qlora_bench.py measures it), prefill
# of 512 tokens, and an evaluation-shaped run over ADGEN dev prompt lengths (qlora: all 1,070;
# the reference stack: the first EVAL_LIMIT, for time), 16 prompts per batch, 128 new tokens.
# QLORA_FLAGS=--lora also measures qlora with an unmerged LoRA adapter.
#
# Usage, from the repository root on the GPU machine:
#   QLORA=<qlora binary> RESULTS=<dir> bench/generate/run.sh
# The reference stack needs torch + transformers on the machine and bitsandbytes on PYTHONPATH
# (see shared/NOTES.md: .anchor-site).
set -euo pipefail
QLORA=${QLORA:-target/release/qlora}
RESULTS=${RESULTS:-bench/generate/results}
LENGTHS=bench/generate/adgen_dev_prompt_lengths.json
EVAL_LIMIT=${EVAL_LIMIT:-32}
QLORA_FLAGS=${QLORA_FLAGS:-}
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/card.txt"
date -u +%Y-%m-%dT%H:%M:%SZ | tee "$RESULTS/date.txt"
"$QLORA" bench generate --eval_prompt_lengths "$LENGTHS" $QLORA_FLAGS --out "$RESULTS/qlora_generate.json"
OUT="$RESULTS" PYTHONUNBUFFERED=1 python3 bench/generate/hf_generate_bench.py --lengths "$LENGTHS" \
    --eval_limit "$EVAL_LIMIT"
