#!/bin/bash
# Session 29, call 2 (~5 min: what device time was left after the refusals), binaries of the
# commit in .gpu/COMMIT (the register flash kernels fed by cp.async, exponentials in
# ex2.approx, ldmatrix addresses split) and trainer-base (bfe50a2): (a) kernels-cubecl's CUDA
# flash tests, each in its own process, with CubeCL's compilation log (the kernels' CUDA source,
# for benches/kernel_regs.py); (b) the attention core beside torch SDPA: this commit's flash
# paths, then bfe50a2's.
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
printf '[compilation]\nlogger = { level = "full", file = "/tmp/r/kernels.log" }\n' > cubecl.toml
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for t in cuda_flash_forward_matches_reference cuda_flash_matches_reference; do
  timeout 120 .gpu/kc_attention --ignored --nocapture --exact cuda::$t >> $R/kc-attention.log 2>&1 || echo "FAILED: $t"
done
grep -E "^test |test result|panicked|error|max" $R/kc-attention.log | head -12 | cut -c1-400
rm -f cubecl.toml; printf '[compilation]\ncache = { file = ".cubecl-cache" }\n[autotune]\ncache = { file = ".cubecl-cache" }\n' > cubecl.toml
[ -f $R/kernels.log ] && xz -T8 -6 $R/kernels.log; pack
export COMMIT=$(cat .gpu/COMMIT)
OUT=/tmp/attn KERNELS="flash-forward flash" bash benches/attention.sh 2>&1 | tail -7
cp -r /tmp/attn $R/; pack
COMMIT=bfe50a2 TRAINER=.gpu/trainer-base OUT=/tmp/attn-base KERNELS="flash-forward flash" bash benches/attention.sh 2>&1 | tail -5
cp -r /tmp/attn-base $R/; pack
true
