#!/usr/bin/env python3
"""PyTorch's LM-head cross-entropy as transformers computes it (logits = h @ W^T in bf16, upcast
to f32, F.cross_entropy, mean over tokens), forward and backward to dh and dW, timed after a
warm-up; peak device memory beyond the inputs. One JSON line, the shape of `trainer bench-loss`."""
import argparse
import json
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=16384)
p.add_argument("--hidden", type=int, default=3584)
p.add_argument("--vocab", type=int, default=152064)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--steps", type=int, default=5)
a = p.parse_args()

dev = torch.device("cuda")
h = torch.randn(a.tokens, a.hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(a.vocab, a.hidden, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
labels = torch.randint(0, a.vocab, (a.tokens,), device=dev)
torch.cuda.synchronize()
inputs = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
times, loss = [], float("nan")
for step in range(a.warmup + a.steps):
    torch.cuda.synchronize()
    t = time.perf_counter()
    logits = h @ w.t()
    l = F.cross_entropy(logits.float(), labels)
    l.backward()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    loss = l.item()
    del logits, l
    h.grad = w.grad = None
    if step >= a.warmup:
        times.append(dt)
print(json.dumps({
    "impl": "torch", "tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab, "dtype": "bf16",
    "step_seconds": times, "s_per_step": sum(times) / len(times), "loss": loss,
    "inputs_gib": inputs / 2**30,
    "peak_extra_gib": (torch.cuda.max_memory_allocated() - inputs) / 2**30,
    "peak_extra_reserved_gib": (torch.cuda.max_memory_reserved() - inputs) / 2**30,
}))
