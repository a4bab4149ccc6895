#!/bin/bash
# Session 26, call 4 (~6 min on an H200): issue 16's case, the whole Qwen3-30B-A3B (48 layers,
# micro batch 4 x 2048), trainer (blockwise attention, the default) beside transformers + peft.
set -u
cd "$(dirname "$0")/../.."
export KERNELS_CUBECL_ATTENTION=blockwise
OUT=$OUT PART=c bash benches/calls/s25-call2.sh
