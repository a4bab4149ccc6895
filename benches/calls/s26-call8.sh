#!/bin/bash
# Session 26, call 8 (~3 min): the experts' LoRA factor gradients as one spread dense GEMM a
# product (KERNELS_CUBECL_GROUPED_OUTER=spread) against cuBLAS's grouped GEMM (a launch a
# group), 30b-mb4 at 8 layers, trainer alone, one command; the GEMM self-check (which now
# includes an 8-wide grouped outer GEMM) runs before each.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 OUT=/tmp/bench
KERNELS_CUBECL_GROUPED_OUTER=spread VARIANT=spread-outer LAYERS=8 TRAINER_TIMEOUT=100 BASELINES= bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
LAYERS=8 TRAINER_TIMEOUT=100 BASELINES= bash benches/run.sh 30b-mb4 >> /tmp/bench.out 2>&1
grep -E "^\| trainer|FAILED|rror" /tmp/bench.out | tail -3
grep -h "self-checks" /tmp/bench/*.log | cut -c1-300
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
true
