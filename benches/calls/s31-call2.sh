#!/bin/bash
# Session 31, call 2 (~7 min): trainer of .gpu2/COMMIT in .gpu2/ (the flash kernels as in call 1's
# .gpu/, plus NVML's counters in metrics and bench): the register flash kernels' speed.
# (a) the attention core beside torch SDPA (benches/attention.sh), the three paths; (b) 7b-mb4 at
# 8 layers, trainer alone, flash against blockwise (its rows' gpu_busy now trainer's own NVML
# reading, gpu_busy_smi beside it); (c) ncu over one launch of each register kernel; (d) NVML in
# a tiny CUDA run's metrics.jsonl: the command fails when no logged step has gpu_busy (alone:
# --nvml-only).
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r2; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r2.tgz -C $R . ; }
source benches/env.sh
for f in .gpu2/*.xz; do [ -e "$f" ] && xz -d -f "$f" && chmod +x "${f%.xz}"; done
export COMMIT=$(cat .gpu2/COMMIT) TRAINER=.gpu2/trainer
if [ "${1:-}" != --nvml-only ]; then
OUT=/tmp/attn KERNELS="blockwise flash-forward flash" bash benches/attention.sh 2>&1 | tail -9
cp -r /tmp/attn $R/; pack
export WARMUP=1 STEPS=3 OUT=/tmp/bench
for k in flash blockwise; do
  KERNELS_CUBECL_ATTENTION=$k VARIANT=$k LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh 7b-mb4 >> /tmp/bench.out 2>&1
  cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
done
grep -E "FAILED|rror" /tmp/bench.out | head -5
python3 -c '
import json
for r in map(json.loads, open("/tmp/bench/results.jsonl")):
    print(r["case"], r["commit"], r["impl"], r.get("variant", ""), r.get("s_per_step"), r.get("tokens_per_s"), r.get("peak_gib"))'
timeout 120 ncu --clock-control none --kernel-name regex:'flash_(forward|backward_q|backward_kv)_mma' --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section InstructionStats .gpu2/trainer bench-attention --device cuda --kernel flash --warmup 0 --steps 1 > $R/ncu-flash.txt 2>&1
grep -E "flash_|Duration|Registers Per|Achieved Occupancy|Executed Ipc A|Warp Cycles Per Issued|Executed Instructions  |Stall Long" $R/ncu-flash.txt | cut -c1-120 | head -30
python3 -c '
import json
for name in ("7b-mb4-L8-trainer-flash", "7b-mb4-L8-trainer-blockwise"):
    r = json.load(open(f"/tmp/bench/{name}.json"))
    print(name, "gpu_busy (NVML)", r.get("gpu_busy"), "nvidia-smi", r.get("gpu_busy_smi"), "device_used_peak_gib", r.get("device_used_peak_gib"))'
cp -r .cubecl-cache $R/ 2>/dev/null; pack
fi
ok=1
.gpu2/trainer run recipes/tiny-qwen3-moe-lora.toml --set 'device="cuda"' --set train.max_steps=60 --set logging.interval=10 --set checkpoint.output_dir=/tmp/nv > $R/nvml-run.log 2>&1 || { ok=; echo "FAILED: tiny CUDA run"; tail -5 $R/nvml-run.log; }
m=$(ls /tmp/nv/*/metrics.jsonl | head -1); cp "$m" $R/nvml-metrics.jsonl 2>/dev/null; ls /tmp/nv/*/plots/ >> $R/nvml-run.log 2>&1; pack
python3 - "$m" <<'PY' || ok=
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
read = [s for s in steps if "gpu_busy" in s]
print(len(steps), "logged steps; gpu_busy", [s.get("gpu_busy") for s in steps], "gpu_mem_used_gib", [s.get("gpu_mem_used_gib") for s in steps])
# A window shorter than NVML's 100 ms reading period may hold no reading (and no key).
assert read, "no logged step has NVML's counters"
assert all(0.0 <= s["gpu_busy"] <= 1.0 and s["gpu_mem_used_gib"] > 0 for s in read), "NVML's counters out of range"
PY
[ -n "$ok" ] || { echo "FAILED: NVML counters"; exit 1; }
true
