#!/bin/bash
# CUDA: an interrupted-and-resumed tiny LoRA run against an uninterrupted one; with TUNING=full,
# a full fine-tuning run in bf16 (its f32 master weights go through the checkpoint).
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:$LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
export CUBECL_AUTOTUNE_LEVEL=minimal
# Build here: cargo build --release --features cuda && mkdir -p .gpu && cp target/release/trainer .gpu/ (carry .gpu).
T=${TRAINER:-.gpu/trainer}
R=recipes/tiny-qwen3-moe-lora.toml
TUNING=${TUNING:-lora}
common=(--set "train.tuning=\"$TUNING\"" --set 'model.config.model_type="qwen3"' --set train.packing=true --set 'device="cuda"' --set 'schedule.decay="constant"' --set schedule.warmup_fraction=0.0 --set lora.dropout=0.1 --set checkpoint.save_interval=4 --set train.eval_interval=6)
set -x
time $T run $R "${common[@]}" --set train.max_steps=12 --set checkpoint.output_dir=/tmp/whole
time $T run $R "${common[@]}" --set train.max_steps=6 --set checkpoint.output_dir=/tmp/cut
cut=$(ls -d /tmp/cut/*)
time $T run $R "${common[@]}" --set train.max_steps=12 --set checkpoint.output_dir=/tmp/cut --resume $cut
FILE=adapter_model.safetensors; [ "$TUNING" = full ] && FILE=model.safetensors
FILE=$FILE python3 - <<'PY'
import glob, json, os
from safetensors.torch import load_file
w = glob.glob(f'/tmp/whole/*/checkpoint-12/{os.environ["FILE"]}')[0]
c = glob.glob(f'/tmp/cut/*/checkpoint-12/{os.environ["FILE"]}')[0]
a, b = load_file(w), load_file(c)
d = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
m = max(float(a[k].float().abs().max()) for k in a)
print(f"{os.environ['FILE']}: {len(a)} tensors; max |whole - resumed| = {d:.3e} (max |w| {m:.3e})")
# The resumed run computes what the uninterrupted one did: anything else fails the check.
assert d == 0.0, "the resumed run's weights differ from the uninterrupted run's"
PY
