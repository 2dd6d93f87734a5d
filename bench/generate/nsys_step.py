# Where a recorded decoding step spends its time, from an Nsight Systems trace of
# `qlora bench generate` (`nsys stats --report cuda_gpu_trace --format csv`, graph nodes traced).
# With early launch a kernel starts (and its time runs) before the one ahead has finished, so
# durations overlap; what a kernel adds to the step is how much later it ends than the kernel
# ahead of it. The steps are cut at each greedy choice (argmax_pairs), the steady ones (the most
# common kernel count) lined up, and per position of the step the medians are printed: what it
# adds, its duration, and when it starts relative to the end of the one ahead.
# Usage: python3 bench/generate/nsys_step.py trace.csv
import csv, sys, statistics as st
from collections import Counter

rows = []
with open(sys.argv[1]) as f:
    for r in csv.DictReader(l for l in f if l.strip() and not l.startswith("Generating")):
        start = next(v for k, v in r.items() if k and k.startswith("Start"))
        dur = next(v for k, v in r.items() if k and k.startswith("Duration"))
        name = r.get("Name", "")
        if not start or not dur or "[CUDA mem" in name:
            continue
        rows.append((int(float(start)), int(float(dur)), name.split("(")[0][:32]))
rows.sort()
steps, cur = [], []
for r in rows:
    cur.append(r)
    if r[2] == "argmax_pairs":
        steps.append(cur)
        cur = []
# Only steps of the tensor-core GEMV (the bench also times the wide one).
steps = [s for s in steps if any(n.startswith("gemv_4bit_tc") for _, _, n in s)]
count = Counter(len(s) for s in steps).most_common(1)[0][0]
steady = [s for s in steps if len(s) == count]
print(f"{len(steps)} steps cut, {len(steady)} steady of {count} kernels")
ends = lambda s: [a + d for a, d, _ in s]
step_us = [(max(ends(s)) - max(ends(p))) / 1e3 for p, s in zip(steady, steady[1:])]
print(f"step (end to end of consecutive steady steps): median {st.median(step_us):.1f} us")
print(f"{'#':>3} {'kernel':32} {'adds us':>8} {'dur us':>7} {'starts us':>9}")
total = 0.0
for i in range(count):
    adds, durs, starts = [], [], []
    for s in steady:
        e = ends(s)
        prev_end = max(e[:i]) if i else None
        durs.append(s[i][1] / 1e3)
        if prev_end is not None:
            adds.append((max(e[: i + 1]) - prev_end) / 1e3)
            starts.append((s[i][0] - prev_end) / 1e3)
    a = st.median(adds) if adds else 0.0
    total += a
    print(f"{i:3d} {s[i][2]:32} {a:8.2f} {st.median(durs):7.2f} {st.median(starts) if starts else 0:9.2f}")
print(f"sum of what each adds: {total:.1f} us")
