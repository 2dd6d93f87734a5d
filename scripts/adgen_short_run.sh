#!/usr/bin/env bash
# A short QLoRA run on the real ADGEN subset (../shared/adgen, not in the repository) against the
# untuned base: 20 steps on SmolLM2-135M-Instruct on the CPU, then greedy generation for the
# first 100 dev examples with and without the adapter, scored as the ADGEN evaluation does.
# Writes into runs/adgen (git-ignored). Build first: cargo build --release -p qlora-trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${ADGEN_DIR:-../shared/adgen}
model=${QLORA_DEMO_GGUF:-${QLORA_CACHE:-$HOME/.cache/qlora}/SmolLM2-135M-Instruct.Q4_1.gguf}
qlora=target/release/qlora
out=runs/adgen
mkdir -p "$out"
head -100 "$data/dev.jsonl" > "$out/dev100.jsonl"
sed -n 1001,1040p "$data/dev.jsonl" > "$out/val40.jsonl"   # validation loss, apart from the 100
"$qlora" train --model_name_or_path "$model" --train_file "$data/train.jsonl" \
  --validation_file "$out/val40.jsonl" --max_steps 20 --batch_size 4 --lr 1e-3 --lora_r 8 \
  --lora_alpha 16 --warmup_steps 2 --max_source_length 64 --max_target_length 128 \
  --eval_steps 20 --out_dir "$out/train" --overwrite
for run in base tuned; do
  adapter=(); [ "$run" = tuned ] && adapter=(--adapter "$out/train/best_model")
  "$qlora" eval --model_name_or_path "$model" "${adapter[@]}" --validation_file "$out/dev100.jsonl" \
    --batch_size 8 --max_new_tokens 128 --output "$out/${run}_predictions.jsonl" | tee "$out/${run}_metrics.json"
done
