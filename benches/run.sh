#!/bin/bash
# trainer beside transformers + peft and transformers + peft + Liger, same shapes, same device
# call, on the GPU machine. Build here first:
#   cargo build --release --features cuda && mkdir -p .gpu && cp target/release/trainer .gpu/ && strip .gpu/trainer
# then (carrying .gpu/trainer, and .whl/ with liger-kernel's wheel):  bash benches/run.sh [CASE...]
# Cases: 7b-mb4 7b-mb16 30b-mb4 (default: 7b-mb4), and full-1.5b: full fine-tuning of Qwen2.5-1.5B
# beside transformers' own loop (f32 master weights under bf16 autocast, fused AdamW; the
# baselines' Liger run is left out). The baselines run first (they start in seconds).
# Every measured run becomes one JSON line appended to $OUT/results.jsonl (the schema of
# benches/results.jsonl: copy the lines there), and benches/compare.py prints the case's table.
# Environment: BASELINES (default "peft liger"; "" for trainer alone), NO_CKPT=1 (baselines
# without gradient checkpointing, trainer without recompute), PROFILE=1 (trainer's per-op
# breakdown), CHECK=1 (trainer's attention self-check), TRAINER_ARGS (more `--set`s),
# COMMIT (the commit measured, written into each row), VARIANT (a label for trainer's row when
# the environment changes what it runs, e.g. TRAINER_GEMM_ORDER=sync), WARMUP, STEPS, LAYERS (build
# only this many decoder layers, full width, in every implementation; the case is named CASE-LN).
set -u
source "$(dirname "$0")/env.sh"
T=${TRAINER:-.gpu/trainer}
WARMUP=${WARMUP:-2}
STEPS=${STEPS:-3}
OUT=${OUT:-/tmp/bench}
BASELINES=${BASELINES-peft liger}
mkdir -p "$OUT"
# Which card each row ran on (H100 and H200 calls are not comparable with each other).
export GPU_NAME=${GPU_NAME:-$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null)}
if [[ " $BASELINES " == *" liger "* ]] && ! python3 -c 'import liger_kernel' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl/liger_kernel-*.whl \
    && export PYTHONPATH=/tmp/liger:${PYTHONPATH:-}
fi

# record NAME CASE RECOMPUTE CMD...: run CMD, sampling the GPU every 100 ms; append one row to
# $OUT/results.jsonl: memory peak above idle (nvidia-smi), the GPU's busy fraction over the
# timed steps (utilization.gpu samples inside the run's `timed_unix` window; trainer's own NVML
# reading of the same counter where its report has one), MFU.
record() {
  local name=$1 case=$2 recompute=$3; shift 3
  local idle; idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0)
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -i 0 -lms 100 > "$OUT/$name.smi" &
  local smi=$!
  "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  tail -4 "$OUT/$name.log" >&2
  python3 - "$OUT" "$name" "$case" "$recompute" "$idle" "$rc" "$*" <<'PY'
import datetime, json, os, sys
out, name, case, recompute, idle, rc, command = sys.argv[1:8]
idle, rc = float(idle), int(rc)
lines = [l for l in open(f"{out}/{name}.json").read().splitlines() if l.startswith("{")]
r = json.loads(lines[-1]) if lines else {"error": f"exit code {rc}, no result"}
samples = []
for l in open(f"{out}/{name}.smi"):
    parts = [p.strip() for p in l.split(",")]
    try:
        t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        samples.append((t, float(parts[1]), float(parts[2])))
    except (ValueError, IndexError):
        pass
peak = (max([s[2] for s in samples] or [idle]) - idle) / 1024
r["peak_gib_smi"] = peak
w = r.get("timed_unix") or [0, 0]
busy = [s[1] for s in samples if w[0] <= s[0] <= w[1]]
# trainer reads NVML itself over its timed steps (the counter nvidia-smi shows); the
# baselines' share comes from these samples.
r["gpu_busy_smi"] = sum(busy) / len(busy) / 100 if busy else None
if r.get("gpu_busy") is None:
    r["gpu_busy"] = r["gpu_busy_smi"]
json.dump(r, open(f"{out}/{name}.json", "w"))
PEAK = 783e12  # cuBLAS bf16 GEMM on one H200, shared/PLATFORM.md
fpt = r.get("flops_per_token")
row = {
    "date": datetime.date.today().isoformat(), "commit": os.environ.get("COMMIT", "unknown"), "case": case,
    "impl": "trainer" if "-trainer" in name else r.get("impl", name),
    "gpus": 1, "device": os.environ.get("GPU_NAME"), "micro_batch": r.get("micro_batch"), "seq_len": r.get("seq_len"), "recompute": recompute == "1",
    "s_per_step": r.get("s_per_step"), "tokens_per_s": r.get("tokens_per_s"), "peak_gib": round(peak, 2),
    "mfu": round(fpt * r["tokens_per_s"] / PEAK, 4) if fpt and r.get("tokens_per_s") else None,
    "gpu_busy": round(r["gpu_busy"], 3) if r["gpu_busy"] is not None else None,
    "syncs_per_step": r.get("syncs_per_step"), "host_wait_s_per_step": r.get("host_wait_s_per_step"), "gemm_ordering": r.get("gemm_ordering"),
    "variant": os.environ.get("VARIANT") if "-trainer" in name else None, "command": command, "error": r.get("error"),
}
path = f"{out}/results.jsonl"
rows = [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []
# The baselines run first: their MFU takes trainer's FLOPs per token once it is known.
for old in rows:
    if old["case"] == case and old.get("mfu") is None and old.get("tokens_per_s") and fpt:
        old["mfu"] = round(fpt * old["tokens_per_s"] / PEAK, 4)
rows.append({k: v for k, v in row.items() if v is not None or k not in ("error", "variant")})
open(path, "w").write("".join(json.dumps(r) + "\n" for r in rows))
print(json.dumps(row))
PY
}

case_args() {
  case $1 in
    7b-mb4)  echo "recipes/qwen2.5-7b-lora.toml tests/data/qwen2.5-7b-instruct 4" ;;
    7b-mb16) echo "recipes/qwen2.5-7b-lora.toml tests/data/qwen2.5-7b-instruct 16" ;;
    30b-mb4) echo "recipes/qwen3-moe-lora.toml tests/data/qwen3-30b-a3b 4" ;;
    full-1.5b) echo "recipes/qwen2.5-7b-lora.toml tests/data/qwen2.5-1.5b-instruct 8 full" ;;
    *) echo "unknown case $1 (7b-mb4 7b-mb16 30b-mb4 full-1.5b)" >&2; exit 2 ;;
  esac
}

recompute=1; ckpt=(); recipe_recompute=()
if [ -n "${NO_CKPT:-}" ]; then
  recompute=0; ckpt=(--no-checkpointing); recipe_recompute=(--set 'train.recompute.granularity="none"')
fi
for c in "${@:-7b-mb4}"; do
  read -r recipe model mb tuning <<< "$(case_args "$c")"
  full=(); baselines=$BASELINES
  if [ "${tuning:-}" = full ]; then
    full=(--set 'train.tuning="full"' --set optimizer.lr=1e-5); baselines=${BASELINES:+peft}
  fi
  layers=(); trainer_layers=()
  if [ -n "${LAYERS:-}" ]; then
    layers=(--layers "$LAYERS"); trainer_layers=(--set "model.config.num_hidden_layers=$LAYERS"); c="$c-L$LAYERS"
  fi
  echo "== $c"
  for b in $baselines; do
    extra=(); [ "$b" = liger ] && extra=(--liger)
    name=$b; [ ${#full[@]} -gt 0 ] && { extra=(--full); name=transformers; }
    record "$c-$name" "$c" "$recompute" python3 benches/baseline_peft.py --config "$model/config.json" \
      --micro-batch "$mb" --seq 2048 --warmup "$WARMUP" --steps "$STEPS" "${ckpt[@]}" "${extra[@]}" "${layers[@]}"
  done
  # shellcheck disable=SC2086
  record "$c-trainer${VARIANT:+-$VARIANT}" "$c" "$recompute" timeout "${TRAINER_TIMEOUT:-3600}" "$T" bench "$recipe" --warmup "$WARMUP" --steps "$STEPS" \
    --set "model.path=\"$model\"" --set 'model.init="random"' --set 'device="cuda"' \
    --set parallel.data=1 --set parallel.tensor=1 --set parallel.expert=1 --set parallel.sequence_parallel=false \
    --set lora.dropout=0.0 --set train.micro_batch_size="$mb" --set train.global_batch_size="$mb" \
    --set train.max_length=2048 "${recipe_recompute[@]}" "${trainer_layers[@]}" "${full[@]}" ${TRAINER_ARGS:-} ${PROFILE:+--profile} ${CHECK:+--check-attention}
  python3 benches/compare.py "$OUT" "$c"
done
