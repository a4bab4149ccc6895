#!/bin/bash
# The attention core alone at Qwen2.5-7B's shapes (batch 4, 28 heads on 4 kv heads, 2048, head
# dim 128), bf16, causal and packed (four segments a row): torch's scaled_dot_product_attention
# and trainer's paths (KERNELS="blockwise flash flash-forward" by default) in one device call;
# forward and backward ms and TFLOP/s, tokens (batch x seq) through both a second, the allocator's
# peak (inputs included). Every case is a line of $OUT/results.jsonl (cases
# attn-causal, attn-packed) and a row of the table printed last.
# Carrying .gpu/trainer (see benches/run.sh):  bash benches/attention.sh
set -u
source "$(dirname "$0")/env.sh"
T=${TRAINER:-.gpu/trainer}
OUT=${OUT:-/tmp/bench}
mkdir -p "$OUT"
export GPU_NAME=${GPU_NAME:-$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null)}
for packed in "" --packed; do
  c=attn-causal; [ -n "$packed" ] && c=attn-packed
  cmd="python3 benches/attention_torch.py $packed"; echo "$cmd" > "$OUT/$c-torch.cmd"
  $cmd > "$OUT/$c-torch.json" 2> "$OUT/$c-torch.log" || tail -3 "$OUT/$c-torch.log"
  for kernel in ${KERNELS:-blockwise flash flash-forward}; do
    cmd="$T bench-attention --device cuda --kernel $kernel $packed"; echo "$cmd" > "$OUT/$c-$kernel.cmd"
    timeout 300 $cmd > "$OUT/$c-$kernel.json" 2> "$OUT/$c-$kernel.log" || tail -3 "$OUT/$c-$kernel.log"
  done
done
python3 - "$OUT" <<'PY'
import datetime, glob, json, os, sys
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(f"{out}/attn-*.json")):
    name = os.path.basename(path)[:-5]
    case, impl = name.split("-", 2)[:2], name.split("-", 2)[2]
    try:
        r = json.loads([l for l in open(path) if l.startswith("{")][-1])
    except (IndexError, ValueError):
        r = {"error": "no result"}
    row = {"date": datetime.date.today().isoformat(), "commit": os.environ.get("COMMIT", "unknown"), "case": "-".join(case),
           "impl": r.get("impl", f"trainer {impl}"), "gpus": 1, "device": os.environ.get("GPU_NAME"),
           "tokens_per_s": r.get("tokens_per_s"), "peak_gib": r.get("peak_gib"), "command": open(path[:-5] + ".cmd").read().strip()}
    row.update({k: r[k] for k in ("kernel", "forward_ms", "backward_ms", "forward_tflops", "backward_tflops", "error") if k in r})
    rows.append(row)
with open(f"{out}/results.jsonl", "a") as f:
    for row in rows:
        f.write(json.dumps(row) + "\n")
print("| case | impl | path | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    if "forward_ms" not in r:
        print(f"| {r['case']} | {r['impl']} | failed | | | | |"); continue
    print(f"| {r['case']} | {r['impl']} | {r['kernel']} | {r['forward_ms']:.2f} | {r['forward_tflops']:.0f} | {r['backward_ms']:.2f} | {r['backward_tflops']:.0f} |")
PY
