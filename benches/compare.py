#!/usr/bin/env python3
"""One benchmark case as a table, from the rows `benches/run.sh` appended to OUT/results.jsonl:
every impl measured for CASE in that call, and trainer's tokens/s and memory over each
baseline's. MFU is trainer's model FLOPs per token (src/train/bench.rs `flops_per_token`, the same
for every impl) over the measured bf16 peak.

    python3 benches/compare.py OUT CASE
"""
import json
import sys

out, case = sys.argv[1:3]
rows = [json.loads(l) for l in open(f"{out}/results.jsonl") if l.strip()]
rows = [r for r in rows if r["case"] == case]
print("| impl | recompute | s/step | tokens/s | peak GiB (nvidia-smi) | MFU | GPU busy | syncs/step |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
fmt = lambda v, f: format(v, f) if v is not None else "?"
for r in rows:
    if r.get("tokens_per_s") is None:
        print(f"| {r['impl']} | {r['recompute']} | failed: {r.get('error')} | | | | | |")
        continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "?"
    busy = f"{100 * r['gpu_busy']:.0f}%" if r.get("gpu_busy") is not None else "?"
    print(f"| {r['impl']} | {r['recompute']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} "
          f"| {mfu} | {busy} | {fmt(r.get('syncs_per_step'), '.0f')} |")
trainer = [r for r in rows if r["impl"] == "trainer" and r.get("tokens_per_s")]
for t in trainer:
    for b in rows:
        if b["impl"] != "trainer" and b.get("tokens_per_s"):
            print(f"trainer / {b['impl']}: {t['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                  f"{t['peak_gib'] / max(b['peak_gib'], 1e-9):.2f}x peak memory")
