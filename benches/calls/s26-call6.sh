#!/bin/bash
# Session 26, call 6 (~5 min): the flash kernels with vectorised loads and each query row's
# readable keys as an interval (no mask reads for causal, packed or padded rows). (a)
# kernels-cubecl's attention tests on CUDA (the flash test alone: see its comment); (b) 30b-mb4
# at 8 layers, trainer with the flash kernels (self-check on), then trainer on the blockwise path
# (the default) beside transformers + peft; (c) a 2-layer 30b step under ncu, every kernel's time.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
timeout 240 .gpu/kc_attention --ignored --nocapture --exact cuda::cuda_flash_matches_reference > $R/kc-attention.log 2>&1 || echo "FAILED: kc_attention flash"
timeout 240 .gpu/kc_attention --ignored --nocapture --skip cuda_flash >> $R/kc-attention.log 2>&1 || echo "FAILED: kc_attention"
grep -E "^test |test result|panicked|relative error|did not" $R/kc-attention.log | head -12; pack
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 OUT=/tmp/bench
c=30b-mb4
KERNELS_CUBECL_ATTENTION=flash VARIANT=flash CHECK=1 LAYERS=8 TRAINER_TIMEOUT=200 BASELINES= bash benches/run.sh $c > /tmp/bench-$c.out 2>&1
LAYERS=8 TRAINER_TIMEOUT=150 BASELINES=peft bash benches/run.sh $c >> /tmp/bench-$c.out 2>&1
grep -E "^\| (trainer|transformers)|FAILED|rror" /tmp/bench-$c.out | tail -4
grep -h "self-checks" /tmp/bench/$c-L8-trainer-flash.log | cut -c1-400
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench-$c.out $R/ 2>/dev/null; pack
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
ARGS=(bench recipes/qwen3-moe-lora.toml --warmup 1 --steps 1
  --set 'model.path="tests/data/qwen3-30b-a3b"' --set 'model.init="random"' --set 'device="cuda"'
  --set parallel.data=1 --set parallel.tensor=1 --set parallel.expert=1 --set parallel.sequence_parallel=false
  --set lora.dropout=0.0 --set train.micro_batch_size=4 --set train.global_batch_size=4 --set train.max_length=2048
  --set model.config.num_hidden_layers=2)
export KERNELS_CUBECL_ATTENTION=flash
timeout 150 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv .gpu/trainer "${ARGS[@]}" > $R/ncu.csv 2> $R/ncu.err
python3 benches/ncu_summary.py $R/ncu.csv > $R/ncu_summary.txt 2>&1; sed -n 3,10p $R/ncu_summary.txt
gzip -f $R/ncu.csv; pack
true
