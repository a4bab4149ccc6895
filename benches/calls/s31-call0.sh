#!/bin/bash
# Session 31, call 0 (~3 min, no binaries; made while trainer builds here): (a) the master-weights
# fixture (tests/fixtures/make_master_weights_fixture.py) to commit; (b) a first look at the
# full-1.5b baseline (transformers' full fine-tuning loop), the target of issue 21.
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r0; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r0.tgz -C $R . ; }
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 tests/fixtures/make_master_weights_fixture.py tests/fixtures/master_weights 2>&1 | tail -8
cp -r tests/fixtures/master_weights $R/; pack
timeout 200 python3 benches/baseline_peft.py --config tests/data/qwen2.5-1.5b-instruct/config.json --full \
  --micro-batch 8 --seq 2048 --warmup 1 --steps 3 > $R/full-1.5b-transformers.json 2> $R/full-1.5b-transformers.log
tail -3 $R/full-1.5b-transformers.log; cat $R/full-1.5b-transformers.json; pack
true
