#!/usr/bin/env python3
"""One benchmark case as a table: trainer against the baseline, MFU by trainer's model FLOPs per
token (same formula for both: src/train/bench.rs `flops_per_token`) over the measured bf16 peak."""
import json
import sys

PEAK = 783e12  # cuBLAS bf16 GEMM on one H200, shared/PLATFORM.md

t, b = (json.load(open(p)) for p in sys.argv[1:3])
fpt = t.get("flops_per_token")
print(f"| impl | s/step | tokens/s | peak GiB (nvidia-smi) | peak GiB (allocator reserved) | MFU |")
print(f"| --- | --- | --- | --- | --- | --- |")
for name, r in (("trainer", t), ("transformers + peft", b)):
    if "tokens_per_s" not in r:
        print(f"| {name} | failed: {r.get('error')} | | | | |")
        continue
    mfu = f"{100 * fpt * r['tokens_per_s'] / PEAK:.1f}%" if fpt else "?"
    reserved = r.get("peak_reserved_gib", r.get("peak_gib_torch_reserved"))
    reserved = f"{reserved:.1f}" if reserved is not None else "?"
    print(f"| {name} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_gib_smi']:.1f} | {reserved} | {mfu} |")
if "tokens_per_s" in t and "tokens_per_s" in b:
    print(f"trainer / baseline tokens/s: {t['tokens_per_s'] / b['tokens_per_s']:.2f}x; "
          f"peak memory ratio {t['peak_gib_smi'] / max(b['peak_gib_smi'], 1e-9):.2f}")
