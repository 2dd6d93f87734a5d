# Where a recorded decoding step's time goes, from an Nsight Systems kernel trace
# (`nsys profile --cuda-graph-trace=node`, then `nsys stats -r cuda_gpu_trace -f csv`): the
# kernels of the last 48 decoding steps (each ends with argmax_pairs) that ran a given kernel
# (`qlora bench generate` ends its tensor-core runs with 65 recorded steps, then times the wide
# GEMV) grouped by name, with their median duration and the median idle time before each (start
# minus the previous kernel's end).
# Usage: python3 bench/generate/nsys_steps.py trace.csv [kernel, default gemv_4bit_tc]
import csv, sys, statistics as st
from collections import defaultdict
rows = list(csv.DictReader(l for l in open(sys.argv[1]) if ',' in l))
def col(r, *names):
    for n in names:
        if n in r: return r[n]
    raise KeyError(names)
ks = sorted((int(col(r, 'Start (ns)', 'Start')), int(col(r, 'Duration (ns)', 'Duration')), col(r, 'Name')[:40])
            for r in rows if col(r, 'Name'))
# Steps: runs of kernels between argmax_pairs; keep those whose shape repeats (decoding steps).
steps, cur = [], []
for k in ks:
    cur.append(k)
    if k[2].startswith('argmax_pairs'):
        steps.append(cur); cur = []
marker = sys.argv[2] if len(sys.argv) > 2 else 'gemv_4bit_tc'
decode = [s for s in steps if any(k[2].startswith(marker) for k in s)][-48:]
n = len(decode[-1])
dur, gap = defaultdict(list), defaultdict(list)
spans, busy = [], []
for s in decode:
    spans.append(s[-1][0] + s[-1][1] - s[0][0]); busy.append(sum(k[1] for k in s))
    for prev, k in zip(s, s[1:]):
        dur[k[2]].append(k[1]); gap[k[2]].append(k[0] - prev[0] - prev[1])
    dur[s[0][2]].append(s[0][1])
print(f"{len(decode)} decoding steps of {n} kernels: span {st.median(spans)/1e3:.1f} us, kernels busy {st.median(busy)/1e3:.1f} us")
print(f"{'kernel':40} {'per step':>8} {'med us':>8} {'gap us':>8} {'total us':>9}")
for name in sorted(dur, key=lambda m: -sum(dur[m])):
    c = len(dur[name]) / len(decode)
    g = st.median(gap[name]) / 1e3 if gap[name] else 0.0
    print(f"{name:40} {c:8.0f} {st.median(dur[name])/1e3:8.2f} {g:8.2f} {c*(st.median(dur[name])/1e3+g):9.1f}")
