//! The table of every weight an architecture has: Hugging Face module path, full shape and how
//! a random init fills it, in transformers' state-dict order. Export walks it to write a model
//! that was built from a seeded random init (no files to copy names from); a test checks it
//! against what [`CausalLm::load`](super::CausalLm::load) asks its weight source for, so the two
//! cannot drift apart.

use super::hf_names;
use super::spec::{ArchSpec, MlpSpec};
use super::weights::InitKind;

/// One weight of the architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseTensor {
    /// Module path plus leaf ([`hf_names::weight`] of a module); the family's
    /// `checkpoint_name` maps it to the file's name.
    pub path: String,
    /// Full shape as Hugging Face stores it (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    pub init: InitKind,
}

impl BaseTensor {
    /// The linear module this tensor is the weight of (`model.layers.0.mlp.down_proj`), if it
    /// is a linear weight: what a LoRA adapter would be attached to.
    pub fn linear_module(&self) -> Option<&str> {
        let module = hf_names::weight_module(&self.path)?;
        (self.shape.len() == 2 && !module.ends_with("norm") && module != hf_names::EMBED_TOKENS).then_some(module)
    }
}

/// Every weight of `spec`, unsharded.
pub fn base_tensors(spec: &ArchSpec) -> Vec<BaseTensor> {
    let mut out = Vec::new();
    let mut push = |path: String, shape: Vec<usize>, init: InitKind| out.push(BaseTensor { path, shape, init });
    let (h, d) = (spec.hidden_size, spec.head_dim);
    push(hf_names::weight(hf_names::EMBED_TOKENS), vec![spec.vocab_size, h], InitKind::Normal);
    for (i, layer) in spec.layers.iter().enumerate() {
        let attn = hf_names::self_attn(i);
        let [q, k, v, o] = hf_names::ATTENTION_PROJECTIONS;
        for (name, out_dim, inp) in [
            (q, spec.num_heads * d, h),
            (k, spec.num_kv_heads * d, h),
            (v, spec.num_kv_heads * d, h),
            (o, h, spec.num_heads * d),
        ] {
            let module = hf_names::child(&attn, name);
            push(hf_names::weight(&module), vec![out_dim, inp], InitKind::Normal);
            if spec.qkv_bias && name != o {
                push(hf_names::bias(&module), vec![out_dim], InitKind::Zeros);
            }
        }
        if spec.qk_norm {
            for norm in hf_names::QK_NORMS {
                push(hf_names::weight(&hf_names::child(&attn, norm)), vec![d], InitKind::Ones);
            }
        }
        let mut mlp = |prefix: String, inter: usize| {
            for (proj, shape) in hf_names::MLP_PROJECTIONS.into_iter().zip([vec![inter, h], vec![inter, h], vec![h, inter]]) {
                push(hf_names::weight(&hf_names::child(&prefix, proj)), shape, InitKind::Normal);
            }
        };
        let block = hf_names::mlp(i);
        match layer.mlp {
            MlpSpec::Dense { intermediate_size } => mlp(block.clone(), intermediate_size),
            MlpSpec::Moe { num_experts, intermediate_size, shared_expert_intermediate_size, .. } => {
                for e in 0..num_experts {
                    mlp(hf_names::expert(&block, e), intermediate_size);
                }
                if let Some(n) = shared_expert_intermediate_size {
                    mlp(hf_names::shared_expert(&block), n);
                }
            }
        }
        if let MlpSpec::Moe { num_experts, shared_expert_intermediate_size, .. } = layer.mlp {
            push(hf_names::weight(&hf_names::router(&block)), vec![num_experts, h], InitKind::Normal);
            if shared_expert_intermediate_size.is_some() {
                push(hf_names::weight(&hf_names::shared_expert_gate(&block)), vec![1, h], InitKind::Normal);
            }
        }
        push(hf_names::weight(&hf_names::input_layernorm(i)), vec![h], InitKind::Ones);
        push(hf_names::weight(&hf_names::post_attention_layernorm(i)), vec![h], InitKind::Ones);
    }
    push(hf_names::weight(hf_names::FINAL_NORM), vec![h], InitKind::Ones);
    if !spec.tie_word_embeddings {
        push(hf_names::weight(hf_names::LM_HEAD), vec![spec.vocab_size, h], InitKind::Normal);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::backend::Cpu;
    use crate::error::Result;
    use crate::model::weights::{HostTensor, RandomInit, TensorRequest, WeightSource};
    use crate::model::{self, hub::Fetch, Registry};
    use crate::parallel::Layout;
    use crate::recipe::{Init, ModelSection};

    /// Records every request the model builder makes.
    struct Recording {
        inner: RandomInit,
        seen: BTreeMap<String, (Vec<usize>, InitKind)>,
    }

    impl WeightSource for Recording {
        fn tensor(&mut self, req: TensorRequest<'_>) -> Result<HostTensor> {
            self.seen.insert(req.name.to_string(), (req.shape.to_vec(), req.init));
            self.inner.tensor(req)
        }
    }

    fn section(extra: &[(&str, toml::Value)]) -> ModelSection {
        let mut cfg = toml::Table::new();
        for (k, v) in [
            ("vocab_size", 32.into()),
            ("hidden_size", 8.into()),
            ("intermediate_size", 12.into()),
            ("num_hidden_layers", 2.into()),
            ("num_attention_heads", 2.into()),
            ("num_key_value_heads", 1.into()),
            ("head_dim", 4.into()),
        ] {
            cfg.insert(k.into(), v);
        }
        for (k, v) in extra {
            cfg.insert(k.to_string(), v.clone());
        }
        ModelSection { config: Some(cfg), init: Init::Random, ..Default::default() }
    }

    #[test]
    fn table_is_what_the_model_loads() {
        let cases = [
            section(&[("model_type", "qwen2".into()), ("tie_word_embeddings", true.into())]),
            section(&[("model_type", "qwen3".into()), ("tie_word_embeddings", false.into())]),
            section(&[
                ("model_type", "qwen3_moe".into()),
                ("num_experts", 3.into()),
                ("num_experts_per_tok", 2.into()),
                ("moe_intermediate_size", 4.into()),
                ("mlp_only_layers", toml::Value::Array(vec![0.into()])),
                ("tie_word_embeddings", false.into()),
            ]),
            section(&[
                ("model_type", "qwen2_moe".into()),
                ("num_experts", 3.into()),
                ("num_experts_per_tok", 2.into()),
                ("moe_intermediate_size", 4.into()),
                ("shared_expert_intermediate_size", 6.into()),
                ("mlp_only_layers", toml::Value::Array(vec![1.into()])),
            ]),
        ];
        for s in cases {
            let plan = model::plan(&s, &Registry::builtin(), Fetch::Config).unwrap();
            let mut rec = Recording { inner: RandomInit { seed: 1, std: 0.02 }, seen: BTreeMap::new() };
            let naming = |p: &str| p.to_string();
            let mut ld = crate::model::layers::Loader::<Cpu> { source: &mut rec, device: Default::default(), naming: &naming };
            crate::model::CausalLm::load(&mut ld, &plan.spec, Layout::SINGLE).unwrap();
            let table: BTreeMap<String, (Vec<usize>, InitKind)> =
                base_tensors(&plan.spec).into_iter().map(|t| (t.path, (t.shape, t.init))).collect();
            assert_eq!(table, rec.seen, "{}", plan.spec.family);
        }
    }

    #[test]
    fn linear_modules_are_the_lora_targets() {
        let t = |p: &str, shape: Vec<usize>| BaseTensor { path: p.into(), shape, init: InitKind::Normal };
        assert_eq!(t("model.layers.0.mlp.experts.3.up_proj.weight", vec![4, 8]).linear_module(), Some("model.layers.0.mlp.experts.3.up_proj"));
        assert_eq!(t("lm_head.weight", vec![4, 8]).linear_module(), Some("lm_head"));
        assert_eq!(t("model.embed_tokens.weight", vec![4, 8]).linear_module(), None);
        assert_eq!(t("model.norm.weight", vec![8]).linear_module(), None);
        assert_eq!(t("model.layers.0.self_attn.q_proj.bias", vec![8]).linear_module(), None);
    }
}
