#!/bin/bash
# Session 28, call 2 (~6 min): the register flash kernels on ldmatrix (fragments four 8x8
# matrices an instruction, transposed by the instruction, no tile staged transposed), masked only
# on the blocks that meet a row's bounds, walking only the key blocks a query block may read.
# (a) kernels-cubecl's CUDA flash tests, each in its own process, with CubeCL's compilation log
# on (the kernels' CUDA source, for ptxas off the GPU machine); (b) the attention core alone
# beside torch SDPA (benches/attention.sh); (c) if (a) passed, 7b-mb4 and 30b-mb4 at 8 layers,
# trainer alone, the flash kernels against the blockwise default.
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
printf '[compilation]\nlogger = { level = "full", file = "/tmp/r/kernels.log" }\n' > cubecl.toml
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ok=1
timeout 200 .gpu/kc_attention --ignored --nocapture --exact cuda::cuda_flash_forward_matches_reference > $R/kc-attention.log 2>&1 || { ok=; echo "FAILED: kc_attention flash-forward"; }
timeout 200 .gpu/kc_attention --ignored --nocapture --exact cuda::cuda_flash_matches_reference >> $R/kc-attention.log 2>&1 || { ok=; echo "FAILED: kc_attention flash"; }
grep -E "^test |test result|panicked|error|max" $R/kc-attention.log | head -12 | cut -c1-400
rm -f cubecl.toml; printf '[compilation]\ncache = { file = ".cubecl-cache" }\n[autotune]\ncache = { file = ".cubecl-cache" }\n' > cubecl.toml
xz -T8 -6 $R/kernels.log; pack
export COMMIT=$(cat .gpu/COMMIT)
OUT=/tmp/attn KERNELS="blockwise flash-forward flash" bash benches/attention.sh 2>&1 | tail -9
cp -r /tmp/attn $R/; pack
if [ -n "$ok" ]; then
  export WARMUP=1 STEPS=3 OUT=/tmp/bench
  for c in 7b-mb4 30b-mb4; do
    KERNELS_CUBECL_ATTENTION=flash VARIANT=flash LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh $c >> /tmp/bench.out 2>&1
    LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh $c >> /tmp/bench.out 2>&1
    cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
  done
  grep -E "FAILED|rror" /tmp/bench.out | head -5
  python3 -c '
import json
for r in map(json.loads, open("/tmp/bench/results.jsonl")):
    print(r["case"], r["commit"], r["impl"], r.get("variant", ""), r.get("s_per_step"), r.get("tokens_per_s"), r.get("peak_gib"), r.get("gpu_busy"))'
fi
true
