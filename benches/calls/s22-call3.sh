#!/bin/bash
# Session 22, call 3. Stacked expert adapters through a whole CUDA run: the tiny MoE recipe
# trained 30 steps on the GPU (checkpoints split the stacks into peft's per-expert tensors),
# exported merged to Hugging Face with the precision check on the GPU; then the dense 7b-mb4
# case beside transformers+peft (the upload change touches every model's weight build).
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fail=0
timeout 150 .gpu/trainer run recipes/tiny-qwen3-moe-lora.toml --set 'device="cuda"' --set train.max_steps=30 --set train.eval_interval=15 \
  --set checkpoint.save_interval=15 --set logging.progress_bar=false --set checkpoint.output_dir=/tmp/tiny > $OUT/tiny.log 2>&1 || { echo "tiny run FAILED"; fail=1; }
tail -2 $OUT/tiny.log
run=$(ls -d /tmp/tiny/tiny-* | head -1)
python3 -c "
import json,safetensors.torch as st
t=st.load_file('$run/checkpoint-30/adapter_model.safetensors')
e=[k for k in t if '.mlp.experts.' in k]
print(len(t),'adapter tensors,',len(e),'of experts; e.g.',e[0],tuple(t[e[0]].shape))"
timeout 200 .gpu/trainer export "$run" --to hf --out /tmp/tiny-hf --test-precision > $OUT/export.log 2>&1 || { echo "export FAILED"; fail=1; }
tail -4 $OUT/export.log
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 TRAINER_TIMEOUT=200 OUT=/tmp/bench
BASELINES=peft bash benches/run.sh 7b-mb4 > /tmp/bench.out 2>&1
grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{" | tail -6
grep "weights built" /tmp/bench/*trainer*.log
cp /tmp/bench/results.jsonl $OUT/
exit $fail
