#!/usr/bin/env bash
# NF4 + double quant quantization and dequantization throughput of a bf16 4096x4096 weight on
# this machine's CPU (criterion, core/benches/quant.rs). Writes results.json beside this script:
# criterion's mean time per iteration and the throughput in parameters per second, with the
# machine, date and commit. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo bench --locked -p qlora-core --bench quant -- --warm-up-time 2 --measurement-time 5
python3 - <<'PY'
import json, os, subprocess, datetime
params = 4096 * 4096
out = {"date": datetime.date.today().isoformat(),
       "commit": subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip(),
       "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
       "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "params": params, "results": {}}
for name in ["quantize", "dequantize", "dequantize_into"]:
    est = json.load(open(f"target/criterion/nf4_bf16_dq_bs64/{name}/new/estimates.json"))
    mean_s = est["mean"]["point_estimate"] / 1e9
    out["results"][name] = {"mean_s": mean_s, "params_per_s": params / mean_s}
json.dump(out, open("bench/quant_cpu/results.json", "w"), indent=1)
for k, v in out["results"].items():
    print(f"{k:16} {v['params_per_s'] / 1e6:8.1f} M params/s  ({v['mean_s'] * 1e3:.1f} ms)")
PY
