#!/bin/bash
# Session 30, call 2 (~3 min), binaries of the working tree in .gpu2/ (f32 master weights for
# parameters stored below f32): (a) the master-weights fixture (torch's AdamW over f32 master
# weights of a tiny bf16 Qwen3, and the same loop without them), then trainer's CUDA test against
# it; (b) with RESUME="full lora" (or either), tests/gpu/resume_check.sh: a resumed run's weights
# against an uninterrupted run's, full bf16 fine-tuning (master weights through the checkpoint)
# and LoRA.
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r2; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r2.tgz -C $R . ; }
source benches/env.sh
for f in .gpu2/*.xz; do [ -e "$f" ] && xz -d -f "$f" && chmod +x "${f%.xz}"; done
if [ "${1:-}" != --resume-only ]; then
  python3 tests/fixtures/make_master_weights_fixture.py tests/fixtures/master_weights 2>&1 | tail -8
  cp -r tests/fixtures/master_weights $R/; pack
  timeout 200 .gpu2/cuda_master_weights --ignored --nocapture > $R/cuda_master_weights.log 2>&1 || echo "FAILED: cuda_master_weights"
  grep -E "losses|torch  |moved|test result|panicked|assert" $R/cuda_master_weights.log | cut -c1-600 | head -12; pack
fi
[ -n "${RESUME:-}" ] && for tuning in $RESUME; do
  TUNING=$tuning TRAINER=.gpu2/trainer timeout 150 bash tests/gpu/resume_check.sh > $R/resume-$tuning.log 2>&1 || echo "FAILED: resume_check $tuning"
  grep -E "tensors;|Error|error|rror:" $R/resume-$tuning.log | head -4; pack
done
true
