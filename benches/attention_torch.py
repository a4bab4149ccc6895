#!/usr/bin/env python3
"""torch's scaled_dot_product_attention at `trainer bench-attention`'s shapes, bf16, forward and
backward (dq, dk, dv) timed apart after a warm-up (medians); one JSON line of the same fields
(peak_gib: torch's largest allocation total, inputs included).
Causal rows run on the flash backend (`is_causal`, `enable_gqa`); packed rows (four segments a
row) need a mask, which the flash backend does not take: they run on the memory-efficient backend
with a boolean block-diagonal causal mask (what a user of SDPA without flash_attn's varlen gets)."""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=4)
p.add_argument("--heads", type=int, default=28)
p.add_argument("--kv-heads", type=int, default=4)
p.add_argument("--seq", type=int, default=2048)
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--packed", action="store_true")
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--steps", type=int, default=10)
a = p.parse_args()

dev = torch.device("cuda")
b, hq, hkv, s, d = a.batch, a.heads, a.kv_heads, a.seq, a.head_dim
torch.manual_seed(0)
q = torch.randn(b, hq, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
dout = torch.randn(b, hq, s, d, device=dev, dtype=torch.bfloat16)
if a.packed:
    cuts = [round(s * f) for f in (0.4, 0.3, 0.2)]
    lengths = [n for n in cuts + [s - sum(cuts)] if n > 0]
    seg = torch.cat([torch.full((n,), i, device=dev) for i, n in enumerate(lengths)])
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(s, s, dtype=torch.bool, device=dev).tril()
    kwargs, backend, name = {"attn_mask": allowed}, SDPBackend.EFFICIENT_ATTENTION, "sdpa-efficient"
    # The masked path repeats k/v per query head itself.
    k_in = lambda t: t.repeat_interleave(hq // hkv, dim=1)
else:
    lengths = [s]
    kwargs, backend, name = {"is_causal": True, "enable_gqa": True}, SDPBackend.FLASH_ATTENTION, "sdpa-flash"
    k_in = lambda t: t
fwd, bwd = [], []
torch.cuda.reset_peak_memory_stats()
with sdpa_kernel(backend):
    for step in range(a.warmup + a.steps):
        for t in (q, k, v):
            t.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k_in(k), k_in(v), **kwargs)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out.backward(dout)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step >= a.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
med = lambda xs: sorted(xs)[len(xs) // 2]
pairs = sum(n * (n + 1) // 2 for n in lengths)
flops = 4.0 * d * pairs * b * hq
f, bw = med(fwd), med(bwd)
print(json.dumps({
    "impl": f"torch {torch.__version__} {name}", "batch": b, "heads": hq, "kv_heads": hkv, "seq": s, "head_dim": d,
    "packed": a.packed, "dtype": "bf16", "kernel": name, "forward_ms": f * 1e3, "backward_ms": bw * 1e3,
    "forward_tflops": flops / f / 1e12, "backward_tflops": 2.5 * flops / bw / 1e12,
    "tokens_per_s": b * s / (f + bw), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
}))
