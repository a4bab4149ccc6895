#!/bin/bash
# Prepared in session 31 for the next session (~8 min): trainer of .gpu/COMMIT in .gpu/ (stripped,
# xz), Auto's attention now the register flash kernels on CUDA.
# (a) Auto's path at 7B shapes (bench-attention without --kernel: expect "Flash");
# (b) the LM head's fused cross-entropy at Qwen2.5-1.5B's and 7B's shapes beside torch, at its
# default chunk and at 512..4096 tokens a chunk (benches/ce.sh CHUNKS): the dW accumulation reads
# and writes the [hidden, vocab] f32 sum once a chunk, 64 times at the default chunk of 256;
# (c) full-1.5b: transformers (checkpointing) beside trainer at full recompute, recompute of the
# first 8 and 4 layers only (block), and none, to find the fastest setting under transformers'
# 64 GiB; (d) 7b-mb4 beside peft with Auto (no KERNELS_CUBECL_ATTENTION), then recomputing the
# first 16 layers only (issue 17's target asks for trainer's best recompute under peft's memory).
# Session 32 (no GPU lent) added: (e) the pinned-staging upload's CUDA test first (.gpu/kc_upload:
# kernels-cubecl's `--test upload` binary, xz, unpacked by env.sh), and each bench's weight build
# (its log's "weights built in" line; session 25: upload at 0.78 GB/s); (f) transformers' greedy
# generations of two fixture models (tests/fixtures/make_generate_fixture.py) for `trainer
# infer`'s decoding, brought back as $OUT/r.tgz's gen-<case>.json (commit them as
# tests/fixtures/<case>/generate.json); (g) `trainer infer`'s cached decoding on CUDA bf16
# against the whole forward (.gpu/cuda_parity, the `--test cuda_parity` binary).
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export COMMIT=$(cat .gpu/COMMIT)
timeout 60 .gpu/trainer bench-attention --device cuda 2>&1 | tail -1 | cut -c1-300
timeout 120 python3 tests/fixtures/make_generate_fixture.py tests/fixtures 2>&1 | tail -3
for c in qwen2_tied_f32 qwen3_moe_f32_sharded; do cp tests/fixtures/$c/generate.json $R/gen-$c.json 2>/dev/null; done; pack
[ -x .gpu/cuda_parity ] && timeout 200 .gpu/cuda_parity --ignored --exact cuda_bf16_cached_decoding_matches_the_whole_forward --nocapture 2>&1 | grep -E "cuda bf16|test result|panicked"
[ -x .gpu/kc_upload ] && timeout 120 .gpu/kc_upload --ignored --test-threads 1 2>&1 | grep -E "^test |test result|panicked"
for shape in "1536 151936" "3584 152064"; do
  read -r h v <<< "$shape"
  OUT=$R/ce-$h TOKENS=16384 HIDDEN=$h VOCAB=$v CHUNKS="512 1024 2048 4096" timeout 240 bash benches/ce.sh 2>&1 | grep -E "^\||fused /"
  pack
done
export OUT=/tmp/bench WARMUP=1 STEPS=3
bash benches/run.sh full-1.5b > /tmp/bench.out 2>&1; pack
block() { echo "--set train.recompute.granularity=\"full\" --set train.recompute.method=\"block\" --set train.recompute.num_layers=$1"; }
VARIANT=block8 TRAINER_ARGS="$(block 8)" BASELINES= bash benches/run.sh full-1.5b >> /tmp/bench.out 2>&1
VARIANT=block4 TRAINER_ARGS="$(block 4)" BASELINES= bash benches/run.sh full-1.5b >> /tmp/bench.out 2>&1
VARIANT=none TRAINER_ARGS='--set train.recompute.granularity="none"' BASELINES= bash benches/run.sh full-1.5b >> /tmp/bench.out 2>&1
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
BASELINES=peft bash benches/run.sh 7b-mb4 >> /tmp/bench.out 2>&1
# Recompute of the first 16 of 28 layers only: by session 31's rows (24.1 GiB at full recompute,
# 56.9 at none) about 38 GiB, under peft's 40.3, for ~7.6 ms a layer not recomputed.
VARIANT=block16 TRAINER_ARGS="$(block 16)" BASELINES= bash benches/run.sh 7b-mb4 >> /tmp/bench.out 2>&1
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
grep -E "FAILED|rror" /tmp/bench.out | head -5
grep -h "weights built" /tmp/bench/*.log | head -8
python3 -c '
import json
for r in map(json.loads, open("/tmp/bench/results.jsonl")):
    print(r["case"], r["impl"], r.get("variant", ""), r.get("recompute"), round(r.get("tokens_per_s") or 0), r.get("peak_gib"), r.get("error", ""))'
cp -r .cubecl-cache $R/ 2>/dev/null; pack
true
