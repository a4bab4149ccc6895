//! The Hugging Face names of the llama-like decoders trainer builds (Qwen2, Qwen3, Qwen2-MoE,
//! Qwen3-MoE and the Llama 3 family of `examples/`): transformers' state-dict keys
//! (`model.layers.3.mlp.experts.5.up_proj.weight`), transformers 5's fused expert parameters and
//! peft's adapter keys (`base_model.model.<module>.lora_A.weight`). The weight loader, the table
//! of base tensors, checkpoints, exports and LoRA targets all meet on these strings, so they are
//! written here and nowhere else.
//!
//! Every family shares these names; a family whose files differ maps them in
//! [`ModelFamily::checkpoint_name`](super::ModelFamily::checkpoint_name), and one with another
//! module tree would provide its own table beside this one.
//!
//! [`burn_paths`] holds the other side, Burn's module paths (`layers.3.moe.experts.5.up_proj`:
//! the field names of [`CausalLm`](super::CausalLm)); [`module_path`] maps one to the other.

/// The token embedding.
pub const EMBED_TOKENS: &str = "model.embed_tokens";
/// The norm after the last layer.
pub const FINAL_NORM: &str = "model.norm";
/// The LM head (absent when tied to the embedding).
pub const LM_HEAD: &str = "lm_head";
/// An attention block's projections, in state-dict order (Burn's fields carry the same names).
pub const ATTENTION_PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
/// Qwen3's per-head query and key norms inside the attention block.
pub const QK_NORMS: [&str; 2] = ["q_norm", "k_norm"];
/// A SwiGLU MLP's projections (a dense MLP's or one expert's), in state-dict order.
pub const MLP_PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
/// transformers 5's fused expert parameters under `mlp.experts`: gate and up as one
/// `[E, 2I, H]`, down as `[E, H, I]`.
pub const FUSED_GATE_UP: &str = "gate_up_proj";
pub const FUSED_DOWN: &str = "down_proj";
/// peft's prefix for the adapter tensors of a `PeftModelForCausalLM`.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// A submodule or tensor of `parent` (module paths join with dots, as PyTorch's do).
pub fn child(parent: &str, name: &str) -> String {
    format!("{parent}.{name}")
}

/// The weight tensor of `module`.
pub fn weight(module: &str) -> String {
    child(module, "weight")
}

/// The bias tensor of `module`.
pub fn bias(module: &str) -> String {
    child(module, "bias")
}

/// The module whose weight tensor `name` is, if it is one.
pub fn weight_module(name: &str) -> Option<&str> {
    name.strip_suffix(".weight")
}

/// Decoder layer `i`.
pub fn layer(i: usize) -> String {
    format!("model.layers.{i}")
}

/// Layer `i`'s attention block (holding [`ATTENTION_PROJECTIONS`] and [`QK_NORMS`]).
pub fn self_attn(i: usize) -> String {
    child(&layer(i), "self_attn")
}

/// Layer `i`'s norm before attention.
pub fn input_layernorm(i: usize) -> String {
    child(&layer(i), "input_layernorm")
}

/// Layer `i`'s norm before the MLP.
pub fn post_attention_layernorm(i: usize) -> String {
    child(&layer(i), "post_attention_layernorm")
}

/// Layer `i`'s MLP block: a dense MLP, or the MoE block holding the router and the experts.
pub fn mlp(i: usize) -> String {
    child(&layer(i), "mlp")
}

/// The router of the MoE block `mlp`.
pub fn router(mlp: &str) -> String {
    child(mlp, "gate")
}

/// Whether module path `module` is a MoE router.
pub fn is_router(module: &str) -> bool {
    module.ends_with("mlp.gate")
}

/// The shared expert of the MoE block `mlp` (Qwen2-MoE): a SwiGLU MLP every token goes through.
pub fn shared_expert(mlp: &str) -> String {
    child(mlp, "shared_expert")
}

/// The gate of the MoE block `mlp`'s shared expert: one output, `sigmoid` of it scales the
/// shared expert's.
pub fn shared_expert_gate(mlp: &str) -> String {
    child(mlp, "shared_expert_gate")
}

/// Whether module path `module` is one of a MoE block's gates: its router or its shared
/// expert's gate (linears whose outputs weigh other modules' outputs).
pub fn is_moe_gate(module: &str) -> bool {
    is_router(module) || module.ends_with("mlp.shared_expert_gate")
}

/// The experts of the MoE block `mlp`: the parent of one module per expert (transformers 4), or
/// the module holding the fused parameters (transformers 5).
pub fn experts(mlp: &str) -> String {
    child(mlp, "experts")
}

/// Expert `e` (a global index) of the MoE block `mlp`.
pub fn expert(mlp: &str, e: usize) -> String {
    format!("{}.{e}", experts(mlp))
}

/// Projection `projection` of global expert `e` of layer `layer`.
pub fn expert_projection(layer: usize, e: usize, projection: &str) -> String {
    child(&expert(&mlp(layer), e), projection)
}

/// Whether module path or tensor name `path` lies inside one expert.
pub fn is_expert(path: &str) -> bool {
    path.contains(".mlp.experts.")
}

/// `(the layer's experts module, expert, projection)` of an expert projection's module path.
pub fn expert_projection_of(module: &str) -> Option<(&str, usize, &str)> {
    let (prefix, proj) = module.rsplit_once('.')?;
    let (experts, e) = prefix.rsplit_once('.')?;
    (experts.ends_with(".mlp.experts") && MLP_PROJECTIONS.contains(&proj)).then_some((experts, e.parse().ok()?, proj))
}

/// `name` (a module path, tensor name or Burn path) with expert index `from` (`.experts.{from}`,
/// then a `.` or the end) numbered `to`: Hugging Face and Burn name experts alike.
pub fn renumber_expert(name: &str, from: usize, to: usize) -> String {
    let (old, new) = (format!(".experts.{from}"), format!(".experts.{to}"));
    match name.match_indices(&old).find(|(i, _)| name[i + old.len()..].is_empty() || name[i + old.len()..].starts_with('.')) {
        Some((i, _)) => format!("{}{new}{}", &name[..i], &name[i + old.len()..]),
        None => name.to_string(),
    }
}

/// A dense SwiGLU projection's module path below its layer's MLP block: a dense MLP's
/// (`model.layers.1.mlp.gate_proj` → `gate_proj`) or a shared expert's
/// (`model.layers.0.mlp.shared_expert.up_proj` → `shared_expert.up_proj`).
pub fn dense_mlp_projection(module: &str) -> Option<&str> {
    let (_, rest) = module.rsplit_once(".mlp.")?;
    let proj = rest.strip_prefix("shared_expert.").unwrap_or(rest);
    MLP_PROJECTIONS.contains(&proj).then_some(rest)
}

/// peft's `target_parameters` entry for the weight of a dense projection
/// ([`dense_mlp_projection`]: `mlp.gate_proj.weight`, `mlp.shared_expert.gate_proj.weight`).
pub fn dense_mlp_parameter(projection: &str) -> String {
    weight(&child("mlp", projection))
}

/// peft's `target_parameters` entry for a fused expert parameter (`mlp.experts.gate_up_proj`).
pub fn fused_expert_parameter(parameter: &str) -> String {
    child(&experts("mlp"), parameter)
}

/// peft's module for the inner of two wrappers nested around one module (`ParamWrapper`).
pub fn peft_base_layer(module: &str) -> String {
    child(module, "base_layer")
}

/// One of a LoRA adapter's two factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    A,
    B,
}

impl Factor {
    /// The factor Burn's field `leaf` (`lora_a` / `lora_b`) holds.
    pub fn of_burn(leaf: &str) -> Factor {
        if leaf == "lora_a" { Factor::A } else { Factor::B }
    }

    /// peft's tensor leaf.
    pub fn peft_leaf(self) -> &'static str {
        match self {
            Factor::A => "lora_A.weight",
            Factor::B => "lora_B.weight",
        }
    }
}

/// peft's tensor name of `factor` of the adapter on module path `module`.
pub fn peft_factor(module: &str, factor: Factor) -> String {
    format!("{PEFT_PREFIX}{module}.{}", factor.peft_leaf())
}

/// `(module path, factor)` of a peft adapter tensor name; `None` for any other name.
pub fn peft_factor_of(name: &str) -> Option<(&str, Factor)> {
    let module = name.strip_prefix(PEFT_PREFIX)?;
    [Factor::A, Factor::B].into_iter().find_map(|f| Some((module.strip_suffix(f.peft_leaf())?.strip_suffix('.')?, f)))
}

/// The Hugging Face module path of the module at Burn path `module` (`layers.0.moe.gate` →
/// `model.layers.0.mlp.gate`), an expert's local index made global by adding
/// `first_expert(layer)` (under expert parallelism a rank holds a block of the experts).
pub fn module_path(module: &str, first_expert: impl Fn(usize) -> usize) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    match parts.as_slice() {
        ["layers", i, rest @ ..] => {
            let first = first_expert(i.parse().unwrap_or(0));
            let mut out = vec!["model".to_string(), "layers".to_string(), i.to_string()];
            let mut k = 0;
            while k < rest.len() {
                match rest[k] {
                    "moe" => out.push("mlp".into()),
                    "experts" if k + 1 < rest.len() => {
                        let e: usize = rest[k + 1].parse().unwrap_or(0);
                        out.push("experts".into());
                        out.push((first + e).to_string());
                        k += 1;
                    }
                    p => out.push(p.to_string()),
                }
                k += 1;
            }
            out.join(".")
        }
        ["embed_tokens", ..] | ["norm", ..] => format!("model.{module}"),
        _ => module.to_string(),
    }
}

/// Burn's module paths of [`CausalLm`](super::CausalLm): its field names, with experts under
/// their local index; the source side of [`module_path`].
pub mod burn_paths {
    /// Layer `i`'s attention block.
    pub fn self_attn(i: usize) -> String {
        format!("layers.{i}.self_attn")
    }

    /// Layer `i`'s dense MLP.
    pub fn mlp(i: usize) -> String {
        format!("layers.{i}.mlp")
    }

    /// Layer `i`'s MoE router.
    pub fn router(i: usize) -> String {
        format!("layers.{i}.moe.gate")
    }

    /// Layer `i`'s shared expert and its gate.
    pub fn shared_expert(i: usize) -> String {
        format!("layers.{i}.moe.shared_expert")
    }

    pub fn shared_expert_gate(i: usize) -> String {
        format!("layers.{i}.moe.shared_expert_gate")
    }

    /// Local expert `e` of layer `i`.
    pub fn expert(i: usize, e: usize) -> String {
        format!("layers.{i}.moe.experts.{e}")
    }

    /// `(layer, local expert)` of a path inside one expert.
    pub fn expert_of(path: &str) -> Option<(usize, usize)> {
        let (layer, rest) = path.strip_prefix("layers.")?.split_once('.')?;
        let (e, _) = rest.strip_prefix("moe.experts.")?.split_once('.')?;
        Some((layer.parse().ok()?, e.parse().ok()?))
    }

    /// Factor `factor` (`lora_a` / `lora_b`) of layer `layer`'s stacked expert adapter of `projection`.
    pub fn expert_lora(layer: usize, projection: &str, factor: &str) -> String {
        format!("layers.{layer}.moe.expert_lora.{projection}.{factor}")
    }

    /// `(layer, projection, factor)` of a path that [`expert_lora`]'s shape could have made.
    pub fn expert_lora_of(path: &str) -> Option<(usize, &str, &str)> {
        let (layer, rest) = path.strip_prefix("layers.")?.split_once('.')?;
        let (projection, factor) = rest.strip_prefix("moe.expert_lora.")?.split_once('.')?;
        Some((layer.parse().ok()?, projection, factor))
    }
}
