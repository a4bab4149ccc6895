//! LoRA: which linear layers get adapters.
//!
//! Targets are written as peft / ms-swift write them: `all-linear` (every linear of the
//! decoder blocks, experts and shared experts included, never the LM head or a MoE block's
//! gates: the router and Qwen2-MoE's one-output `shared_expert_gate`), a module name
//! (`q_proj` matches every `...q_proj`), or a regular expression over the full module path
//! written `re:<regex>` (`re:.*layers\.[0-3]\..*proj`). An adapter is a [`LoraAdapter`] held by
//! the targeted linear layer; a MoE layer's experts hold theirs stacked, a projection at a time
//! ([`ExpertAdapter`]).

mod adapter;
mod experts;

pub use adapter::{training_forward, LoraAdapter, LoraConfig};
pub use experts::{stacked_factor, ExpertAdapter, ExpertAdapters, EXPERT_PROJECTIONS};

use burn::module::{Module, Param};
use crate::backend::TrainBackend;
use regex::Regex;

use crate::error::{Error, Result};
use crate::model::{hf_names, CausalLm};
use crate::parallel::Partition;

/// Freeze every base weight of `model` and attach a fresh adapter to each linear layer that
/// `targets` matches. Returns the model and the number of adapted layers; an error when nothing
/// matches (a target list that adapts nothing is a mistake, not a no-op).
pub fn apply<B: TrainBackend>(model: CausalLm<B>, targets: &LoraTargets, cfg: &LoraConfig) -> Result<(CausalLm<B>, usize)> {
    let mut model = model.no_grad();
    let device = model.rope_inv_freq.device();
    let mut adapted = 0;
    for (path, linear) in model.linears_mut() {
        if is_expert_linear(&path) {
            continue;
        }
        if targets.matches(&path) {
            if path == hf_names::LM_HEAD && matches!(linear.partition, Partition::Column(g) if g.size > 1) {
                return Err(Error::model(
                    "lora.targets adapts lm_head, whose columns are split by vocabulary across the tensor-parallel ranks here; \
                     an adapter on the vocab-parallel head is not supported: remove lm_head from lora.targets, or set parallel.tensor = 1",
                ));
            }
            let (inp, out) = linear.dims();
            linear.lora = Some(match linear.partition {
                // A row-parallel layer's A is this rank's block of rows of the one-device A:
                // drawn whole (its random stream and bound are the whole layer's), then sliced.
                Partition::Row(g) if g.size > 1 => {
                    let mut adapter = LoraAdapter::init(cfg, &path, inp * g.size, out, &device);
                    let rows = g.block(inp * g.size);
                    let block = adapter.lora_a.val().narrow(0, rows.start, rows.len()).into_data();
                    adapter.lora_a = Param::from_tensor(burn::tensor::Tensor::from_data(block, (&device, burn::tensor::DType::F32)));
                    adapter
                }
                _ => LoraAdapter::init(cfg, &path, inp, out, &device),
            });
            adapted += 1;
        }
    }
    for (i, layer) in model.layers.iter_mut().enumerate() {
        let Some(moe) = layer.moe.as_mut() else { continue };
        let local = moe.first_expert..moe.first_expert + moe.experts.len();
        let Some(expert) = moe.experts.first() else { continue };
        let dims = [expert.gate_proj.dims(), expert.up_proj.dims(), expert.down_proj.dims()];
        for (projection, (inp, out)) in EXPERT_PROJECTIONS.into_iter().zip(dims) {
            let paths: Vec<String> = (0..moe.num_experts).map(|g| hf_names::expert_projection(i, g, projection)).collect();
            let chosen: Vec<bool> = paths.iter().map(|p| targets.matches(p)).collect();
            if !chosen[local.clone()].contains(&true) {
                continue;
            }
            adapted += chosen[local.clone()].iter().filter(|&&c| c).count();
            let slot = moe.expert_lora.get_mut(projection).expect("a SwiGLU projection");
            *slot = Some(ExpertAdapter::init(cfg, &paths, chosen, local.clone(), inp, out, &device));
        }
    }
    if adapted == 0 {
        return Err(Error::model(format!(
            "lora.targets = {:?} matches no linear layer of this model; use \"all-linear\", a name like \"q_proj\", or \"re:<regex over module paths>\"",
            targets.source
        )));
    }
    Ok((model, adapted))
}

/// Whether the linear at module path `path` is one of a MoE layer's experts (adapted stacked).
fn is_expert_linear(path: &str) -> bool {
    hf_names::is_expert(path)
}

#[derive(Debug, Clone)]
pub struct LoraTargets {
    /// The targets as written in the recipe.
    pub source: Vec<String>,
    all_linear: bool,
    names: Vec<String>,
    patterns: Vec<Regex>,
}

impl LoraTargets {
    pub fn parse(targets: &[String]) -> Result<Self> {
        let mut t = LoraTargets { source: targets.to_vec(), all_linear: false, names: vec![], patterns: vec![] };
        for s in targets {
            if s == "all-linear" {
                t.all_linear = true;
            } else if let Some(re) = s.strip_prefix("re:") {
                let r = Regex::new(&format!("^(?:{re})$"))
                    .map_err(|e| Error::model(format!("lora.targets: `{s}` is not a valid regex: {e}")))?;
                t.patterns.push(r);
            } else if s.is_empty() {
                return Err(Error::model("lora.targets: empty target name; use `all-linear`, a module name like `q_proj`, or `re:<regex>`"));
            } else {
                t.names.push(s.clone());
            }
        }
        Ok(t)
    }

    /// Whether the linear at Hugging Face module path `path` ([`hf_names`]) gets an adapter.
    pub fn matches(&self, path: &str) -> bool {
        let leaf = path.rsplit('.').next().unwrap_or(path);
        let never_by_default = leaf == hf_names::LM_HEAD || hf_names::is_moe_gate(path);
        (self.all_linear && !never_by_default)
            || self.names.iter().any(|n| n == leaf || n == path)
            || self.patterns.iter().any(|r| r.is_match(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[&str]) -> LoraTargets {
        LoraTargets::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn all_linear_skips_head_and_gates() {
        let all = t(&["all-linear"]);
        assert!(all.matches("model.layers.0.self_attn.q_proj"));
        assert!(all.matches("model.layers.0.mlp.experts.5.down_proj"));
        assert!(!all.matches("lm_head"));
        assert!(!all.matches("model.layers.0.mlp.gate"));
        assert!(t(&["all-linear", "lm_head"]).matches("lm_head"));
        // Qwen2-MoE: the shared expert is adapted, its gate (one output) only when named.
        assert!(all.matches("model.layers.0.mlp.shared_expert.gate_proj"));
        assert!(!all.matches("model.layers.0.mlp.shared_expert_gate"));
        assert!(t(&["all-linear", "shared_expert_gate"]).matches("model.layers.0.mlp.shared_expert_gate"));
    }

    #[test]
    fn names_and_regexes() {
        let q = t(&["q_proj", "re:.*layers\\.1\\..*down_proj"]);
        assert!(q.matches("model.layers.4.self_attn.q_proj"));
        assert!(!q.matches("model.layers.4.self_attn.k_proj"));
        assert!(q.matches("model.layers.1.mlp.down_proj"));
        assert!(!q.matches("model.layers.11.mlp.down_proj"));
        assert!(LoraTargets::parse(&["re:(".to_string()]).is_err());
    }
}
