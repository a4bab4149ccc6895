#!/bin/bash
# CUDA: an interrupted-and-resumed tiny LoRA run against an uninterrupted one.
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
export CUBECL_AUTOTUNE_LEVEL=minimal
# Build here: cargo build --release --features cuda && mkdir -p .gpu && cp target/release/trainer .gpu/ (carry .gpu).
T=.gpu/trainer
R=recipes/tiny-qwen3-moe-lora.toml
common=(--set 'model.config.model_type="qwen3"' --set train.packing=true --set 'device="cuda"' --set 'schedule.decay="constant"' --set schedule.warmup_fraction=0.0 --set lora.dropout=0.1 --set checkpoint.save_interval=4 --set train.eval_interval=6)
set -x
time $T run $R "${common[@]}" --set train.max_steps=12 --set checkpoint.output_dir=/tmp/whole
time $T run $R "${common[@]}" --set train.max_steps=6 --set checkpoint.output_dir=/tmp/cut
cut=$(ls -d /tmp/cut/*)
time $T run $R "${common[@]}" --set train.max_steps=12 --set checkpoint.output_dir=/tmp/cut --resume $cut
python3 - <<'PY'
import glob, json
from safetensors.torch import load_file
w = glob.glob('/tmp/whole/*/checkpoint-12/adapter_model.safetensors')[0]
c = glob.glob('/tmp/cut/*/checkpoint-12/adapter_model.safetensors')[0]
a, b = load_file(w), load_file(c)
d = max(float((a[k] - b[k]).abs().max()) for k in a)
m = max(float(a[k].abs().max()) for k in a)
print(f"adapter tensors {len(a)}; max |whole - resumed| = {d:.3e} (max |w| {m:.3e})")
PY
