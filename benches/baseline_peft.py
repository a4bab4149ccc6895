#!/usr/bin/env python3
"""The PyTorch baseline trainer is measured against: transformers + peft LoRA training steps on
random-init weights of a real architecture, random token ids, bf16, SDPA attention, gradient
checkpointing, AdamW. Prints one JSON line like `trainer bench`.

    python3 benches/baseline_peft.py --config tests/data/qwen2.5-7b-instruct/config.json \
        --micro-batch 4 --seq 2048 --warmup 2 --steps 5

LoRA: rank 8, alpha 32, dropout 0, every linear layer of the blocks (peft's `all-linear`); on
transformers 5 MoE models the fused expert parameters are added through `target_parameters`
(peft's ParamWrapper needs dropout 0), so every expert is adapted as in trainer.

--full: full fine-tuning instead, as transformers' Trainer runs it with `bf16=True`: f32 weights
(the master copies) under bf16 autocast, f32 gradients, `torch.optim.AdamW(fused=True)` at lr
1e-5.
"""
import argparse
import json
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--layers", type=int, help="build only this many decoder layers (full width)")
    p.add_argument("--full", action="store_true", help="full fine-tuning (f32 master weights, bf16 autocast)")
    p.add_argument("--liger", action="store_true",
                   help="patch in Liger kernels (rope, rms_norm, swiglu, fused linear cross-entropy) first")
    a = p.parse_args()

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(a.config)
    if a.layers:
        cfg.num_hidden_layers = a.layers
    impl = f"transformers {transformers.__version__}" + ("" if a.full else " + peft")
    if a.liger:
        # Before the model is built: Liger swaps the modeling module's classes and forward.
        from liger_kernel.transformers import _apply_liger_kernel
        import liger_kernel
        _apply_liger_kernel(cfg.model_type, rope=True, rms_norm=True, swiglu=True,
                            cross_entropy=False, fused_linear_cross_entropy=True)
        impl += f" + liger {getattr(liger_kernel, '__version__', '0.8.5')}"
    cfg._attn_implementation = "sdpa"
    t0 = time.time()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if a.full else torch.bfloat16)
    moe = getattr(cfg, "num_experts", 0) or 0
    if not a.full:
        lora = LoraConfig(
            r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if not a.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not a.full:
            model.enable_input_require_grads()
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    if a.full:
        opt = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    torch.cuda.synchronize()
    build = time.time() - t0
    times, losses, window = [], [], [0.0, 0.0]
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq), device="cuda")
        torch.cuda.synchronize()
        t = time.time()
        if step == a.warmup:
            window[0] = t
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.full):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.time() - t
        losses.append(float(out.loss))
        if step >= a.warmup:
            times.append(dt)
            window[1] = time.time()
    s = sum(times) / len(times)
    print(json.dumps({
        "impl": impl, "recompute": not a.no_checkpointing, "timed_unix": window,
        "micro_batch": a.micro_batch, "seq_len": a.seq, "steps": a.steps, "step_seconds": times,
        "s_per_step": s, "tokens_per_s": a.micro_batch * a.seq / s, "build_seconds": build,
        "peak_gib_torch_reserved": torch.cuda.max_memory_reserved() / 2**30,
        "peak_gib_torch_allocated": torch.cuda.max_memory_allocated() / 2**30,
        "trainable_params": sum(q.numel() for q in trainable), "losses": losses,
    }))


if __name__ == "__main__":
    main()
