#!/bin/bash
# trainer against the transformers + peft baseline, same shapes, same device call, on the GPU
# machine. Build here first:
#   cargo build --release --features cuda && mkdir -p .gpu && cp target/release/trainer .gpu/ && strip .gpu/trainer
# then (carrying .gpu/trainer):  bash benches/run.sh [CASE...]
# The baseline runs first (it starts in seconds; trainer's first CUDA steps autotune).
# Cases: 7b-mb4 7b-mb16 30b-mb4 (default: 7b-mb4). Each case prints trainer's and the
# baseline's JSON lines, then benches/compare.py prints the table (tokens/s, s/step, peak GiB
# by nvidia-smi, MFU on the measured bf16 peak of 783 TFLOP/s). PROFILE=1 adds trainer's
# per-op breakdown (`trainer bench --profile`: one more step, synchronised around each op);
# CHECK=1 the attention self-check against the CPU reference (minutes on a fresh machine).
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} NCCL_NVLS_ENABLE=0
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
T=${TRAINER:-.gpu/trainer}
WARMUP=${WARMUP:-2}
STEPS=${STEPS:-3}
OUT=${OUT:-/tmp/bench}
mkdir -p "$OUT"

# Run "$@", sampling GPU memory every 100 ms; append the peak above idle (GiB) to its JSON line.
with_peak() {
  local name=$1; shift
  local idle; idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 > "$OUT/$name.smi" &
  local smi=$!
  "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  tail -5 "$OUT/$name.log" >&2
  python3 - "$OUT/$name.json" "$OUT/$name.smi" "$idle" "$rc" <<'PY'
import json, sys
path, smi, idle, rc = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
r = json.loads(lines[-1]) if lines else {"error": f"exit code {rc}, no result"}
peak = max([float(x) for x in open(smi).read().split() if x.strip()] or [idle])
r["peak_gib_smi"] = (peak - idle) / 1024
json.dump(r, open(path, "w"))
print(json.dumps({k: v for k, v in r.items() if k not in ("step_seconds", "losses", "profile", "reserved_gib")}))
PY
}

case_args() {
  case $1 in
    7b-mb4)  echo "recipes/qwen2.5-7b-lora.toml tests/data/qwen2.5-7b-instruct 4" ;;
    7b-mb16) echo "recipes/qwen2.5-7b-lora.toml tests/data/qwen2.5-7b-instruct 16" ;;
    30b-mb4) echo "recipes/qwen3-moe-lora.toml tests/data/qwen3-30b-a3b 4" ;;
    *) echo "unknown case $1 (7b-mb4 7b-mb16 30b-mb4)" >&2; exit 2 ;;
  esac
}

for c in "${@:-7b-mb4}"; do
  read -r recipe model mb <<< "$(case_args "$c")"
  echo "== $c"
  with_peak "$c-baseline" python3 benches/baseline_peft.py --config "$model/config.json" \
    --micro-batch "$mb" --seq 2048 --warmup "$WARMUP" --steps "$STEPS"
  with_peak "$c-trainer" timeout "${TRAINER_TIMEOUT:-3600}" "$T" bench "$recipe" --warmup "$WARMUP" --steps "$STEPS" \
    --set "model.path=\"$model\"" --set 'model.init="random"' --set 'device="cuda"' \
    --set parallel.data=1 --set parallel.tensor=1 --set parallel.expert=1 --set parallel.sequence_parallel=false \
    --set lora.dropout=0.0 --set train.micro_batch_size="$mb" --set train.global_batch_size="$mb" \
    --set train.max_length=2048 ${PROFILE:+--profile} ${CHECK:+--check-attention}
  python3 benches/compare.py "$OUT/$c-trainer.json" "$OUT/$c-baseline.json"
done
