#!/bin/bash
# The LM-head cross-entropy alone, 16k tokens x 152k vocab x 3584 hidden (Qwen2.5-7B's head), bf16:
# PyTorch (logits materialised, transformers' way), trainer's fused kernel, and trainer through
# materialised logits, in one device call. Forward + backward to dh and dW; memory beyond the
# inputs (PyTorch: max_memory_allocated; trainer: the allocator's reserved pool, an upper bound).
# Carrying .gpu/trainer (see benches/run.sh):  bash benches/ce.sh  (TOKENS, HIDDEN, VOCAB: other shapes;
# CHUNKS: the fused kernel also at these tokens per chunk)
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
T=${TRAINER:-.gpu/trainer}
ARGS="--tokens ${TOKENS:-16384} --hidden ${HIDDEN:-3584} --vocab ${VOCAB:-152064}"
OUT=${OUT:-/tmp/bench}
mkdir -p "$OUT"
python3 benches/ce_torch.py $ARGS > "$OUT/ce-torch.json"
"$T" bench-loss $ARGS --device cuda > "$OUT/ce-fused.json" 2> "$OUT/ce-fused.log"; tail -2 "$OUT/ce-fused.log"
# CHUNKS="512 1024 ...": the fused kernel again at each chunk size (tokens per chunk).
names="ce-torch ce-fused"
for c in ${CHUNKS:-}; do
  "$T" bench-loss $ARGS --device cuda --chunk-tokens "$c" > "$OUT/ce-fused-c$c.json" 2> "$OUT/ce-fused-c$c.log"; names="$names ce-fused-c$c"
done
"$T" bench-loss $ARGS --device cuda --unfused > "$OUT/ce-unfused.json" 2> "$OUT/ce-unfused.log"; tail -2 "$OUT/ce-unfused.log"
python3 - "$OUT" $names ce-unfused <<'PY'
import json, sys
rows = []
for name in sys.argv[2:]:
    try:
        rows.append((name, json.load(open(f"{sys.argv[1]}/{name}.json"))))
    except Exception as e:
        rows.append((name, {"error": str(e)}))
print("| impl | chunk | s/step (fwd+bwd) | memory beyond inputs, GiB | loss |")
print("| --- | --- | --- | --- | --- |")
for name, r in rows:
    if "s_per_step" not in r:
        print(f"| {name} | | failed: {r.get('error')} | | |"); continue
    print(f"| {name} | {r.get('chunk_tokens', '')} | {r['s_per_step']:.4f} | {r['peak_extra_gib']:.2f} | {r['loss']:.4f} |")
t, f = dict(rows).get("ce-torch", {}), dict(rows).get("ce-fused", {})
if "peak_extra_gib" in t and f.get("peak_extra_gib") is not None:
    print(f"fused / torch: time {f['s_per_step'] / t['s_per_step']:.2f}x, memory {f['peak_extra_gib'] / t['peak_extra_gib']:.3f}x")
PY
