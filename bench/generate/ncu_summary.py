# Per-kernel durations of an `ncu --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum` run:
# kernels grouped by name, grid and bytes read; median time, bytes, achieved bandwidth.
# Usage: python3 bench/generate/ncu_summary.py ncu.csv
import csv, sys, statistics as st
from collections import defaultdict
rows = list(csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"')))
by = defaultdict(lambda: defaultdict(dict))
for r in rows:
    by[r['ID']][r['Metric Name']] = r['Metric Value']; by[r['ID']]['name'] = r['Kernel Name'][:40]; by[r['ID']]['grid'] = r.get('Grid Size','')
k = defaultdict(list)
for i, m in by.items():
    t = float(m.get('gpu__time_duration.sum', 'nan').replace(',', ''))
    b = float(m.get('dram__bytes_read.sum', 'nan').replace(',', ''))
    k[(m['name'], m['grid'], round(b / 1e6))].append((t, b))
print(f"{'kernel':40} {'grid':>16} {'n':>5} {'med us':>8} {'MB':>8} {'GB/s':>7}")
for (name, grid, _), v in sorted(k.items(), key=lambda kv: -sum(x[0] for x in kv[1])):
    t = st.median(x[0] for x in v) / 1e3; b = st.median(x[1] for x in v) / 1e6
    print(f"{name:40} {grid:>16} {len(v):5d} {t:8.2f} {b:8.2f} {b/t*1e3 if t else 0:7.0f}")
