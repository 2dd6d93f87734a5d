#!/usr/bin/env bash
# Data-parallel QLoRA (qlora train / bench train --nproc_per_node N) on one 2- or 4-GPU host:
#  1. correctness: the golden tiny BLOOM trained on 1 GPU (--gradient_steps 2) and on 2 GPUs
#     (--gradient_steps 1), --batch_size 4 per GPU, the same seed: the same global batch of 8, so
#     the two train_log.jsonl must agree within bf16 noise; prints the max relative difference
#     of loss, grad_norm and val_loss per step (and writes it to dp_check.json);
#  2. benchmark: BLOOM-7b1 shapes, random weights, 16x128 per GPU with gradient checkpointing,
#     on 1, 2 and (when there are 4) 4 GPUs: tokens/s over all GPUs, scaling efficiency
#     (tok/s on N / (N x tok/s on 1)) and the NCCL all-reduce time per step.
#
# Usage, from the repository root on the GPU machine (no Rust needed; the binary is carried):
#   QLORA=target/release/qlora OUT=<dir> bench/data_parallel/run.sh
# NCCL comes from the torch venv's nvidia-nccl wheel, which ships only libnccl.so.2: a link
# named libnccl.so (the name cudarc loads) goes into a directory put on LD_LIBRARY_PATH.
set -euo pipefail
QLORA=${QLORA:-target/release/qlora}
OUT=${OUT:-bench/data_parallel/results}
PYTHON=${PYTHON:-/opt/torch/.venv/bin/python3}
STEPS=${STEPS:-8}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
QLORA=$(cd "$(dirname "$QLORA")" && pwd)/$(basename "$QLORA")

# NVLink multicast (NVLS) is off on these hosts.
export NCCL_NVLS_ENABLE=0
NCCL_LIB=$("$PYTHON" -c 'import nvidia.nccl, os; print(os.path.join(os.path.dirname(nvidia.nccl.__file__), "lib"))')
mkdir -p "$OUT/nccl-lib"
ln -sf "$NCCL_LIB/libnccl.so.2" "$OUT/nccl-lib/libnccl.so"
export LD_LIBRARY_PATH="$OUT/nccl-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/cards.txt"
nvidia-smi topo -m > "$OUT/topology.txt" 2>&1 || true
"$PYTHON" -c 'import nvidia.nccl, torch; print("NCCL", torch.cuda.nccl.version())' | tee "$OUT/nccl_version.txt" || true
date -u +%Y-%m-%dT%H:%M:%SZ | tee "$OUT/date.txt"
if [ "$GPUS" -lt 2 ]; then
    echo "need at least 2 GPUs, found $GPUS" >&2
    exit 1
fi

# --- 1. correctness: tiny BLOOM, 1 GPU x (4 x 2 micro-batches) vs 2 GPUs x (4 x 1) ---
WORK="$OUT/check"
rm -rf "$WORK" && mkdir -p "$WORK/model"
cp tests/fixtures/golden/tiny-bloom/{config.json,generation_config.json,model.safetensors} "$WORK/model/"
"$PYTHON" - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
specials = ["<unk>", "<s>", "</s>", "<pad>"]
colors = ["red", "blue", "green", "black", "white"]
items = ["shirt", "coat", "skirt", "hat"]
words = ["color", "item", "a", "that", "looks", "great", "="]
tokens = specials + colors + items + words
added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": True} for i, t in enumerate(specials)]
tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
             "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
             "decoder": None,
             "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)},
                       "unk_token": "<unk>"}}
json.dump(tokenizer, open(f"{work}/model/tokenizer.json", "w"))
json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
          open(f"{work}/model/tokenizer_config.json", "w"))
def record(i):
    c, it = colors[i % 5], items[(i // 5) % 4]
    return json.dumps({"content": f"color {c} item {it}", "summary": f"a {c} {it} that looks great"})
open(f"{work}/train.jsonl", "w").write("".join(record(i) + "\n" for i in range(40)))
open(f"{work}/dev.jsonl", "w").write("".join(record(i) + "\n" for i in range(3, 11)))
PY
TRAIN_FLAGS=(--model_name_or_path "$WORK/model" --train_file "$WORK/train.jsonl"
    --validation_file "$WORK/dev.jsonl" --prompt_template "{query} = {answer}"
    --device cuda --max_steps 30 --lr 2e-2 --lora_r 4 --lora_alpha 8 --lora_dropout 0.1
    --warmup_steps 2 --eval_steps 10 --save_steps 15 --batch_size 4 --seed 7)
"$QLORA" train "${TRAIN_FLAGS[@]}" --gradient_steps 2 --out_dir "$WORK/one_gpu" 2>&1 | tail -n 8
"$QLORA" train "${TRAIN_FLAGS[@]}" --gradient_steps 1 --nproc_per_node 2 --out_dir "$WORK/two_gpus" 2>&1 | tail -n 12
"$PYTHON" - "$WORK" "$OUT/dp_check.json" <<'PY'
import json, sys
work, out = sys.argv[1], sys.argv[2]
def log(name):
    return [json.loads(l) for l in open(f"{work}/{name}/train_log.jsonl")]
one, two = log("one_gpu"), log("two_gpus")
assert len(one) == len(two) == 30, (len(one), len(two))
worst = {}
for key in ("loss", "grad_norm", "val_loss"):
    diffs = [abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(one, two) if key in a]
    worst[key] = max(diffs)
result = {"steps": len(one), "max_relative_difference": worst,
          "first_loss": [one[0]["loss"], two[0]["loss"]],
          "last_loss": [one[-1]["loss"], two[-1]["loss"]],
          "allreduce_ms_mean": sum(r["allreduce_ms"] for r in two) / len(two)}
json.dump(result, open(out, "w"), indent=2)
print("1 GPU vs 2 GPUs, 30 steps, global batch 8:", json.dumps(result))
PY

# --- 2. benchmark: BLOOM-7b1 shapes, 16x128:gc per GPU, 1 / 2 / 4 GPUs ---
"$QLORA" bench train --configs 16x128:gc --steps "$STEPS" --out "$OUT/bench_1gpu.json" > /dev/null
for n in 2 4; do
    if [ "$GPUS" -ge "$n" ]; then
        "$QLORA" bench train --configs 16x128:gc --steps "$STEPS" --nproc_per_node "$n" \
            --out "$OUT/bench_${n}gpu.json" > /dev/null
    fi
done
"$PYTHON" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = []
for n in (1, 2, 4):
    path = f"{out}/bench_{n}gpu.json"
    if os.path.exists(path):
        r = json.load(open(path))["train"][0]
        rows.append(r)
base = rows[0]["tok_s"]
summary = []
print("| GPUs | tok/s (all GPUs) | tok/s per GPU | scaling efficiency | all-reduce ms/step | step s |")
print("|---|---|---|---|---|---|")
for r in rows:
    n = r["world_size"]
    eff = r["tok_s"] / (n * base)
    ar = r.get("allreduce_ms_median")
    summary.append({"gpus": n, "tok_s": r["tok_s"], "tok_s_per_gpu": r["tok_s_per_gpu"],
                    "scaling_efficiency": eff, "allreduce_ms_median": ar,
                    "step_s_median": r["step_s_median"]})
    print(f"| {n} | {r['tok_s']:.0f} | {r['tok_s_per_gpu']:.0f} | {100 * eff:.1f}% | "
          f"{'-' if ar is None else f'{ar:.2f}'} | {r['step_s_median']:.3f} |")
json.dump(summary, open(f"{out}/scaling.json", "w"), indent=2)
PY
