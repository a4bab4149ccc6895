#!/usr/bin/env python3
"""`trainer export` against its real consumers: transformers loads the `--to hf` folder and peft
loads the `--to peft` adapter onto the base, and both give trainer's logits.

Run where torch, transformers 5.17 and peft 0.21 are installed (the GPU machine has them; on a
CPU machine `pip install torch==2.11.0 transformers==5.17.0 peft==0.21.0` does too: everything
here runs on the CPU) from the repository root, with a trainer binary:

    python3 tests/gpu/export_check.py .gpu/trainer        # EXPORT_CASES=a,b picks cases

Per case: transformers makes and saves a small random base (its own save_pretrained: names,
dtype, shards as the Hub's files have them); `trainer run` trains LoRA on all linear layers on
the tiny dataset; `trainer export` writes `--to hf` (f32 and the default dtype) and `--to peft`
and runs its own precision check, saving the sample and trainer's logits; then transformers
(merged folder) and peft (base + adapter) compute logits of the same ids in f32 on the CPU. The
script prints every difference and exits 1 if one is out of tolerance.
"""
import json
import os
import subprocess
import sys
import tempfile

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3MoeConfig

TRAINER = sys.argv[1] if len(sys.argv) > 1 else ".gpu/trainer"
VOCAB = 512  # assets/tiny/tokenizer.json


def moe(**kw):
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, initializer_range=0.2, router_aux_loss_coef=0.0,
    )
    base.update(kw)
    return Qwen3MoeConfig(**base)


def cases():
    """(name, config, stored dtype, shard size, extra [lora] lines)."""
    # Dense with q/k/v bias, untied head, stored in bf16 and sharded (as Qwen2.5-7B is).
    yield "qwen2_bf16_sharded", Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2,
    ), torch.bfloat16, "100KB", ""
    # MoE, every expert adapted (the peft side needs transformers 5's fused-expert layout).
    yield "qwen3_moe_f32", moe(), torch.float32, "5GB", ""
    # Dense MLPs beside sparse experts: every other layer sparse, then one layer listed dense;
    # rslora off and on (the padded rank changes alpha differently).
    for rslora in ["false", "true"]:
        yield f"qwen3_moe_sparse_step2_rslora_{rslora}", moe(num_hidden_layers=4, decoder_sparse_step=2), \
            torch.float32, "5GB", f"rslora = {rslora}"
        yield f"qwen3_moe_mlp_only_rslora_{rslora}", moe(num_hidden_layers=3, mlp_only_layers=[1]), \
            torch.float32, "5GB", f"rslora = {rslora}"


def sh(*args):
    print("+", " ".join(args), flush=True)
    r = subprocess.run(args, capture_output=True, text=True)
    print(r.stdout[-1500:], r.stderr[-1500:], flush=True)
    if r.returncode != 0:
        raise SystemExit(f"command failed with {r.returncode}")
    return r.stdout


def recipe(work, base, lora_extra=""):
    text = f"""
device = "cpu"
[model]
path = "{base}"
tokenizer = "assets/tiny/tokenizer.json"
model_name = ["小通", "Tiny"]
model_author = ["测试组", "trainer"]
[lora]
rank = 8
alpha = 32
dropout = 0.05
targets = ["all-linear"]
{lora_extra}
[train]
micro_batch_size = 4
max_length = 256
max_steps = 30
[optimizer]
lr = 5e-3
[checkpoint]
output_dir = "{work}/runs"
save_interval = 30
[logging]
progress_bar = false
[data]
datasets = ["assets/tiny/train.jsonl"]
"""
    path = os.path.join(work, "recipe.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids[None, :]).logits[0].float()


def compare(what, got, want, tol):
    d = (got - want).abs()
    scale = float(want.abs().max())
    agree = int((got.argmax(-1) == want.argmax(-1)).sum())
    ok = float(d.max()) <= tol * scale and agree == want.shape[0]
    print(f"  {what:<58} max |diff| {float(d.max()):.3e} (max |logit| {scale:.2f}), mean {float(d.mean()):.3e}, "
          f"argmax {agree}/{want.shape[0]}  {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def main():
    print("versions", "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
    torch.manual_seed(0)
    all_ok = True
    only = [c for c in os.environ.get("EXPORT_CASES", "").split(",") if c]
    for name, cfg, dtype, shard, lora_extra in cases():
        if only and name not in only:
            continue
        work = tempfile.mkdtemp(prefix=f"export-{name}-")
        base = os.path.join(work, "base")
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
        model.save_pretrained(base, max_shard_size=shard)
        print(f"\n## {name}: base saved by transformers ({dtype}):", sorted(os.listdir(base)), flush=True)
        sh(TRAINER, "run", recipe(work, base, lora_extra))
        run = os.path.join(work, "runs", next(d for d in os.listdir(os.path.join(work, "runs")) if d.startswith("recipe-")))
        out = {}
        for label, args in [
            ("hf-f32", ["--to", "hf", "--dtype", "f32", "--max-shard-size", "200KB"]),
            ("hf", ["--to", "hf"]),  # the recipe's model.dtype: bf16
        ]:
            out[label] = os.path.join(work, label)
            sh(TRAINER, "export", run, *args, "--out", out[label], "--test-precision",
               "--precision-logits", os.path.join(work, f"{label}.logits.safetensors"))
        out["peft"] = os.path.join(work, "peft")
        sh(TRAINER, "export", run, "--to", "peft", "--out", out["peft"])

        ref = load_file(os.path.join(work, "hf-f32.logits.safetensors"))
        ids = ref["input_ids"].long()
        trained = ref["logits_trained"]
        print(f"  sample: {ids.numel()} tokens; trainer's own check of hf-f32: exported vs trained max "
              f"{float((ref['logits_exported'] - trained).abs().max()):.3e}")
        merged = AutoModelForCausalLM.from_pretrained(out["hf-f32"], dtype=torch.float32).eval()
        all_ok &= compare("transformers(--to hf --dtype f32) vs trainer unmerged", logits(merged, ids), trained, 1e-4)
        default = AutoModelForCausalLM.from_pretrained(out["hf"], dtype=torch.float32).eval()
        ref_default = load_file(os.path.join(work, "hf.logits.safetensors"))
        all_ok &= compare("transformers(--to hf, bf16) vs trainer reading the same file",
                          logits(default, ids), ref_default["logits_exported"], 1e-4)
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        adapted = PeftModel.from_pretrained(base_model, out["peft"]).eval()
        all_ok &= compare("peft(base + --to peft) vs trainer unmerged", logits(adapted, ids), trained, 1e-4)
        with open(os.path.join(out["peft"], "adapter_config.json")) as f:
            c = json.load(f)
        print(f"  adapter_config: r {c['r']}, alpha {c['lora_alpha']}, target_modules {c['target_modules']}, "
              f"target_parameters {c.get('target_parameters')}")
    print("\nall ok" if all_ok else "\nSOME CHECKS FAILED")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
