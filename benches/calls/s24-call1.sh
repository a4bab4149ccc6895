#!/bin/bash
# Session 24, call 1 (session 23's calls 2/3 never started). First transformers' router
# load-balancing loss on the MoE fixtures (tests/fixtures/make_router_loss_fixtures.py). kernels-cubecl's GEMM tests on CUDA
# (the grouped GEMM, forward and both gradients, f32 and bf16: ff7f8b1's fix of the weight
# gradient); a failure stops the call. Then Qwen3-30B-A3B at 8 of 48 layers: transformers+peft
# then trainer grouped (profiled) in one run.sh, a 30-step CUDA run of the tiny MoE recipe,
# last the same binary padded (TRAINER_EXPERT_GEMM=padded, session 22's layout). Results are copied to $OUT after each part, so a call cut short keeps what ran.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Everything lands in /tmp/r, packed into $OUT/r.tgz after each part (at most 8 files come back).
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
# The router load-balancing loss of transformers on the MoE fixtures (CPU, seconds).
python3 tests/fixtures/make_router_loss_fixtures.py tests/fixtures $R/router_loss > $R/router_loss.log 2>&1 || echo "router loss fixtures FAILED"
tail -2 $R/router_loss.log; pack
# Every transformers fixture again into /tmp/fx (the new qwen2_moe_f32 case comes back; the others
# are compared with the committed ones: the script draws the same values).
python3 tests/fixtures/make_fixtures.py /tmp/fx > $R/fixtures.log 2>&1 || echo "fixtures FAILED"
for c in qwen2_tied_f32 qwen3_moe_f32_sharded llama3_f32; do cmp tests/fixtures/$c/expected.safetensors /tmp/fx/$c/expected.safetensors && echo "$c: same"; done
cp -r /tmp/fx/qwen2_moe_f32 $R/ 2>/dev/null; pack
fail=0
for t in cuda_f32_gemms_match_reference cuda_bf16_gemms_match_reference; do
  timeout 120 .gpu/kc_linear --ignored --exact "cuda::$t" --nocapture > $R/kc-$t.log 2>&1 || { echo "FAILED: $t"; fail=1; }
  grep -E "test result|panicked|error" $R/kc-$t.log | head -4
done
pack
[ $fail = 0 ] || exit 1
export COMMIT=$(cat .gpu/COMMIT) LAYERS=8 WARMUP=1 STEPS=3 TRAINER_TIMEOUT=200 OUT=/tmp/bench
# trainer first (device time was short this session): grouped, profiled; then peft and trainer
# again in one run.sh (the ratio of one call).
BASELINES= PROFILE=1 VARIANT=profiled bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
grep -h "weights built" /tmp/bench/*trainer*.log
BASELINES=peft bash benches/run.sh 30b-mb4 >> /tmp/bench.out 2>&1
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{"
grep -h "weights built" /tmp/bench/*trainer*.log
timeout 100 .gpu/trainer run recipes/tiny-qwen3-moe-lora.toml --set 'device="cuda"' --set train.max_steps=30 --set train.eval_interval=15 \
  --set logging.progress_bar=false --set checkpoint.output_dir=/tmp/tiny > $R/tiny.log 2>&1 || echo "tiny run FAILED"
tail -1 $R/tiny.log; pack
TRAINER_EXPERT_GEMM=padded VARIANT=padded BASELINES= bash benches/run.sh 30b-mb4 >> /tmp/bench.out 2>&1
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
grep -h "weights built" /tmp/bench/*trainer-padded*.log
true
