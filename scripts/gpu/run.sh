#!/usr/bin/env bash
# On a GPU machine, from the repository root, with .cuda-bin/ from scripts/gpu/pack.sh carried
# along: the CUDA tests and the generation benchmarks of one device call, everything under $OUT
# (packed at the end into $OUT/results.tgz; PACK=0 leaves it loose).
#   MODES="tests decode" DECODES="qlora qlora_other" scripts/gpu/run.sh
# Modes, run in the order given:
#   tests     the kernel tests, cuda_golden and cuda_generate (logs t_*.log; a summary printed)
#   decode    `qlora bench generate` (no reference stack) with each packed binary of DECODES in
#             turn: same card, same call, so their steps compare; BENCH_FLAGS adds flags
#             (the evaluation-shaped run: --eval_prompt_lengths
#             bench/generate/adgen_dev_prompt_lengths.json)
#   ncu       Nsight Compute over each binary of DECODES on a 4-layer model (caches flushed
#             between kernels): per-kernel median times and bandwidth (ncu_summary.py)
#   generate  bench/generate/run.sh with qlora.gz: against transformers + bitsandbytes (needs
#             .anchor-site, from shared/anchors/get-wheels.sh, carried too)
# Each part runs under its own time limit, so one that hangs does not take the call's others.
set -u
: "${OUT:?OUT: the folder whose files come back}"
MODES=${MODES:-tests}
DECODES=${DECODES:-qlora}
BENCH_FLAGS=${BENCH_FLAGS:-}
bin=/tmp/qlora-bin
mkdir -p "$bin"
for f in .cuda-bin/*.gz; do
  n="$(basename "$f" .gz)"
  gunzip -c "$f" > "$bin/$n" && chmod +x "$bin/$n"
done
export QLORA_FIXTURES="$PWD/tests/fixtures"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
date -u +%Y-%m-%dT%H:%M:%SZ | tee "$OUT/date.txt"
for mode in $MODES; do
  case $mode in
    tests)
      for t in t_kernels t_cuda_golden t_cuda_generate; do
        SECONDS=0
        timeout 300 "$bin/$t" --test-threads=1 --nocapture > "$OUT/$t.log" 2>&1
        echo "== $t: exit $? after ${SECONDS}s"
        # Without a device the tests skip, saying so: count those lines, not only the passes.
        echo "lines saying skipped: $(grep -c skipped "$OUT/$t.log")"
        grep -E "^test .*(FAILED|ok)$|test result|panicked" "$OUT/$t.log" | tail -30
      done ;;
    decode)
      for n in $DECODES; do
        SECONDS=0
        timeout 300 "$bin/$n" bench generate $BENCH_FLAGS --out "$OUT/decode_$n.json" > "$OUT/decode_$n.log" 2>&1
        echo "== decode $n: exit $? after ${SECONDS}s"
        if [ ! -f "$OUT/decode_$n.json" ]; then tail -5 "$OUT/decode_$n.log"; continue; fi
        python3 - "$OUT/decode_$n.json" <<'PY'
import json, sys
keys = ["lora", "merged_adapter", "decode_step_ms", "decode_step_unrecorded_ms", "decode_tok_s_bs1", "fraction_of_floor",
        "floor_tok_s", "copy_bandwidth_gb_s", "prefill_tok_s", "eval_examples_s", "peak_alloc_gib"]
for r in json.load(open(sys.argv[1]))["generate"]:  # one entry per adapter setting (--lora)
    print({k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keys if k in r})
PY
      done ;;
    ncu)
      ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      for n in $DECODES; do
        SECONDS=0
        timeout 400 "$ncu" --clock-control none --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum \
          "$bin/$n" bench generate --layers 4 --out "$OUT/ncu_$n.json" > "$OUT/ncu_$n.csv" 2> "$OUT/ncu_$n.log"
        echo "== ncu $n: exit $? after ${SECONDS}s"
        python3 bench/generate/ncu_summary.py "$OUT/ncu_$n.csv" | tee "$OUT/ncu_$n.txt" | head -16
      done ;;
    generate)
      SECONDS=0
      PYTHONPATH="$PWD/.anchor-site" QLORA="$bin/qlora" RESULTS="$OUT/generate" \
        timeout 480 bench/generate/run.sh > "$OUT/generate.log" 2>&1
      echo "== generate: exit $? after ${SECONDS}s"; tail -5 "$OUT/generate.log" ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
done
# A device call brings back only a few loose files: everything goes back as one archive
# (`tar xzf results.tgz` here), unless the caller packs $OUT itself (PACK=0).
if [ "${PACK:-1}" = 1 ]; then
  tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/results.tgz"
fi
