#!/bin/bash
# Session 21, call 1. Issue 15: `trainer run --nproc-per-node 1` on CUDA forms NCCL groups (a
# world of one through the launcher and the rendezvous) and trains as the same run without the
# launcher does. Issue 16: Qwen3-30B-A3B at 8 of its 48 layers (full width), transformers+peft
# beside trainer with experts stacked from load time and the binary from before that.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
common=(--set 'device="cuda"' --set train.max_steps=30 --set train.eval_interval=15 --set checkpoint.save_interval=15 --set logging.progress_bar=false)
timeout 150 .gpu/trainer run recipes/tiny-qwen3-moe-lora.toml --nproc-per-node 1 "${common[@]}" --set checkpoint.output_dir=/tmp/launched > $OUT/launched.log 2>&1
echo "launched rc=$?"
grep -E 'groups formed|lora:|error|warning' $OUT/launched.log | head -8; tail -3 $OUT/launched.log
timeout 150 .gpu/trainer run recipes/tiny-qwen3-moe-lora.toml "${common[@]}" --set checkpoint.output_dir=/tmp/plain > $OUT/plain.log 2>&1
echo "plain rc=$?"
python3 - <<'PY'
import glob, json
def losses(root):
    run = sorted(glob.glob(f"{root}/*/metrics.jsonl"))[-1]
    return [r["loss"] for r in map(json.loads, open(run)) if "loss" in r]
a, b = losses("/tmp/launched"), losses("/tmp/plain")
worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
print(f"losses: launched (NCCL world of one) {a[0]:.5f}..{a[-1]:.5f}, plain {b[0]:.5f}..{b[-1]:.5f}, {len(a)} vs {len(b)} steps, worst relative difference {worst:.2e}")
PY
cp /tmp/launched/*/metrics.jsonl $OUT/launched-metrics.jsonl 2>/dev/null
export COMMIT=$(cat .gpu/COMMIT) LAYERS=8 WARMUP=1 STEPS=3 TRAINER_TIMEOUT=200
BASELINES=peft PROFILE=1 bash benches/run.sh 30b-mb4
COMMIT=0988640 VARIANT=unstacked TRAINER=.gpu/trainer-old BASELINES= bash benches/run.sh 30b-mb4
