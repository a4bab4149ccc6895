//! From Burn parameter paths (`layers.3.moe.experts.5.up_proj.lora.lora_a`) to the names the
//! Hugging Face world uses: transformers' state-dict keys for full weights and peft's for
//! adapters. The names are [`hf_names`]'s; this adds what only the built model knows (each
//! rank's first expert) and which tensors are stored transposed.

use crate::backend::TrainBackend;

use crate::model::hf_names::{self, Factor};
use crate::model::CausalLm;

/// Where a trainable tensor goes in a Hugging Face file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfName {
    pub name: String,
    /// Stored here as `[in, out]` where Hugging Face stores `[out, in]`.
    pub transposed: bool,
}

/// The Hugging Face module path of the module at Burn path `module` (`layers.0.moe.gate` →
/// `model.layers.0.mlp.gate`), with expert indices made global.
pub fn module_path<B: TrainBackend>(model: &CausalLm<B>, module: &str) -> String {
    hf_names::module_path(module, |layer| model.layers.get(layer).and_then(|l| l.moe.as_ref()).map_or(0, |m| m.first_expert))
}

/// peft's name of one expert's factor (`lora_a` or `lora_b`) of a stacked expert adapter
/// ([`crate::lora::ExpertAdapter`]), stored as `[out, in]` like every peft factor.
pub fn expert_adapter_name(layer: usize, expert: usize, projection: &str, factor: &str) -> String {
    hf_names::peft_factor(&hf_names::expert_projection(layer, expert, projection), Factor::of_burn(factor))
}

/// The Hugging Face name of the parameter at Burn path `path`: a transformers key for model
/// weights, a peft key for LoRA factors.
pub fn hf_name<B: TrainBackend>(model: &CausalLm<B>, path: &str) -> HfName {
    for (suffix, factor) in [(".lora.lora_a", Factor::A), (".lora.lora_b", Factor::B)] {
        if let Some(linear) = path.strip_suffix(suffix) {
            return HfName { name: hf_names::peft_factor(&module_path(model, linear), factor), transposed: true };
        }
    }
    if path == "embed_tokens" {
        return HfName { name: hf_names::weight(hf_names::EMBED_TOKENS), transposed: false };
    }
    let (module, leaf) = path.rsplit_once('.').unwrap_or(("", path));
    let is_linear_weight = leaf == "weight" && !module.ends_with("norm");
    HfName { name: hf_names::child(&module_path(model, module), leaf), transposed: is_linear_weight }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::model::{self, hub::Fetch, Registry};
    use crate::parallel::Layout;
    use crate::recipe::ModelSection;

    /// A one-layer MoE model of `model_type` with random weights (`extra` config keys beside).
    fn tiny_moe(model_type: &str, extra: &[(&str, toml::Value)]) -> (model::ModelPlan, crate::model::CausalLm<Cpu>) {
        let mut cfg = toml::Table::new();
        for (k, v) in [
            ("model_type", toml::Value::String(model_type.into())),
            ("vocab_size", 32.into()),
            ("hidden_size", 8.into()),
            ("intermediate_size", 8.into()),
            ("moe_intermediate_size", 4.into()),
            ("num_hidden_layers", 1.into()),
            ("num_attention_heads", 2.into()),
            ("num_key_value_heads", 1.into()),
            ("head_dim", 4.into()),
            ("num_experts", 4.into()),
            ("num_experts_per_tok", 2.into()),
        ] {
            cfg.insert(k.into(), v);
        }
        for (k, v) in extra {
            cfg.insert(k.to_string(), v.clone());
        }
        let section = ModelSection { config: Some(cfg), init: crate::recipe::Init::Random, ..Default::default() };
        let plan = model::plan(&section, &Registry::builtin(), Fetch::Config).unwrap();
        let m = model::build::<Cpu>(&plan, &section, Layout::SINGLE, &Default::default()).unwrap();
        (plan, m)
    }

    #[test]
    fn burn_paths_become_transformers_and_peft_names() {
        let (_, m) = tiny_moe("qwen3_moe", &[]);
        let n = |p: &str| hf_name(&m, p);
        assert_eq!(n("embed_tokens"), HfName { name: "model.embed_tokens.weight".into(), transposed: false });
        assert_eq!(n("norm.weight"), HfName { name: "model.norm.weight".into(), transposed: false });
        assert_eq!(n("layers.0.self_attn.q_norm.weight").name, "model.layers.0.self_attn.q_norm.weight");
        assert!(!n("layers.0.self_attn.q_norm.weight").transposed);
        assert_eq!(
            n("layers.0.moe.experts.3.up_proj.weight"),
            HfName { name: "model.layers.0.mlp.experts.3.up_proj.weight".into(), transposed: true }
        );
        assert_eq!(n("layers.0.moe.gate.weight").name, "model.layers.0.mlp.gate.weight");
        assert_eq!(
            n("layers.0.self_attn.v_proj.lora.lora_b").name,
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
        );
        assert_eq!(n("lm_head.weight").name, "lm_head.weight");
        assert_eq!(expert_adapter_name(0, 3, "up_proj", "lora_b"), "base_model.model.model.layers.0.mlp.experts.3.up_proj.lora_B.weight");
    }

    /// Qwen2-MoE's shared expert and its gate: every weight a full checkpoint holds is named as
    /// the base checkpoint names it (same size), and every base tensor is one of them.
    #[test]
    fn shared_expert_weights_are_named_as_the_base_tensors() {
        let (plan, m) = tiny_moe("qwen2_moe", &[("shared_expert_intermediate_size", 6.into())]);
        assert_eq!(hf_name(&m, "layers.0.moe.shared_expert.up_proj.weight"), HfName { name: "model.layers.0.mlp.shared_expert.up_proj.weight".into(), transposed: true });
        assert_eq!(hf_name(&m, "layers.0.moe.shared_expert_gate.weight").name, "model.layers.0.mlp.shared_expert_gate.weight");
        assert_eq!(
            hf_name(&m, "layers.0.moe.shared_expert.down_proj.lora.lora_a").name,
            "base_model.model.model.layers.0.mlp.shared_expert.down_proj.lora_A.weight"
        );
        let table: std::collections::BTreeMap<String, usize> =
            crate::model::tensors::base_tensors(&plan.spec).into_iter().map(|t| (t.path, t.shape.iter().product())).collect();
        let mut named = std::collections::BTreeSet::new();
        for (path, t, _) in super::super::checkpoints::named_params(&m, &|_| true) {
            let name = hf_name(&m, &path).name;
            assert_eq!(table.get(&name), Some(&t.dims().iter().product()), "{path} as {name}");
            named.insert(name);
        }
        assert_eq!(named.len(), table.len());
        assert!(named.contains("model.layers.0.mlp.shared_expert_gate.weight"));
    }
}
