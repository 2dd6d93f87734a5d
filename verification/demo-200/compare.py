# The 200-step demo run (SmolLM2-135M-Instruct GGUF, nf4 + double quant, LoRA r=8, lr 1e-3,
# dropout 0) on the CPU path and on CUDA (bf16 and f32): training loss per step and the
# validation losses. python3 verification/demo-200/compare.py
import json, re, statistics
here = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
def jsonl(name):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{here}/{name}")) if "loss" in r and "step" in r}
cpu, bf16 = jsonl("cpu_train_log.jsonl"), jsonl("cuda_bf16_train_log.jsonl")
f32 = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/200: loss ([\d.]+)", open(f"{here}/cuda_f32_log.txt").read())}
def report(name, other):
    steps = sorted(set(cpu) & set(other))
    rel = [abs(other[s] - cpu[s]) / cpu[s] for s in steps]
    print(f"{name}: {len(steps)} steps; |loss - cpu| / cpu: median {statistics.median(rel):.2e}, max {max(rel):.2e} (step {steps[rel.index(max(rel))]}); "
          f"first {other[steps[0]]:.4f} vs {cpu[steps[0]]:.4f}, last {other[steps[-1]]:.4f} vs {cpu[steps[-1]]:.4f}")
report("cuda bf16", bf16)
report("cuda f32 (every 10th step, 4 decimals)", f32)
