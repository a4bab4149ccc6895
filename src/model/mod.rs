//! Models: a registry of families, each compiling a Hugging Face config into an [`ArchSpec`],
//! and the one generic decoder ([`CausalLm`]) built from a spec and a weight source.

pub mod causal_lm;
pub mod expert_layout;
pub mod experts;
pub mod family;
pub mod generate;
pub mod hf_names;
pub mod hf_config;
pub mod hub;
pub mod layers;
pub mod linear;
pub mod llama_like;
pub mod moe;
pub mod qwen2;
pub mod qwen2_moe;
pub mod qwen3;
pub mod qwen3_moe;
pub mod router_balance;
pub mod routing;
pub mod routing_memo;
pub mod spec;
pub mod summary;
pub mod tensors;
pub mod weights;

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::TrainBackend;

pub use causal_lm::{causal_lm_loss, CausalLm, DecoderLayer, IGNORE_INDEX};
pub use layers::SequenceContext;
pub use router_balance::RouterBalance;
pub use routing_memo::RoutingMemo;
pub use family::{ModelFamily, Registry};
pub use hf_config::HfConfig;
pub use spec::{ArchSpec, LayerSpec, MlpSpec};

use crate::error::{Error, Result};
use crate::parallel::Layout;
use crate::recipe::{Init, ModelSection, ParallelSection};
use layers::Loader;
use weights::{Checkpoint, RandomInit, WeightSource};

/// A model section resolved against the registry and its config: what will be built.
pub struct ModelPlan {
    pub family: Arc<dyn ModelFamily>,
    pub config: HfConfig,
    pub spec: ArchSpec,
    /// The folder holding config and weights, when `model.path` is set.
    pub dir: Option<PathBuf>,
    /// Things to tell the user: `[model.config]` keys the family does not read.
    pub warnings: Vec<String>,
}

/// Read the config (from `model.path` and/or `[model.config]`), pick the family and compile the
/// architecture. Touches no weights; `fetch` says what a hub id should download.
pub fn plan(model: &ModelSection, registry: &Registry, fetch: hub::Fetch) -> Result<ModelPlan> {
    let dir = match &model.path {
        Some(p) => Some(hub::resolve_model_dir(p, std::path::Path::new("."), fetch)?),
        None => None,
    };
    let from_file = match &dir {
        Some(d) => Some(HfConfig::from_file(&d.join("config.json"))?),
        None => None,
    };
    let inline = match &model.config {
        Some(t) => Some(HfConfig::from_toml(t, "recipe [model.config]")?),
        None => None,
    };
    let config = match (from_file, inline) {
        (Some(f), Some(i)) => f.overlay(&i),
        (Some(f), None) => f,
        (None, Some(i)) => i,
        (None, None) => {
            return Err(Error::model(
                "the recipe names no model: set model.path (a folder or hub id) or [model.config]",
            ))
        }
    };
    let model_type: String = match &model.family {
        Some(_) => config.get_or("model_type", String::new())?,
        None => config.model_type()?,
    };
    let family = registry.resolve(model.family.as_deref(), &model_type)?;
    let spec = family.arch(&config)?;
    spec.check().map_err(|e| Error::model(format!("{}: {e}", config.source)))?;
    let warnings = match &model.config {
        Some(table) => config
            .unread(table)
            .into_iter()
            .map(|(key, near)| {
                format!(
                    "[model.config] key `{key}` is not read by the {} family{}",
                    family.name(),
                    near.map(|n| format!("; did you mean `{n}`?")).unwrap_or_else(|| " (ignored)".into())
                )
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(ModelPlan { family, config, spec, dir, warnings })
}

/// The layout rules that need the architecture: heads, KV heads and MLP widths divisible by
/// the tensor-parallel size; experts divisible by the expert-parallel size.
pub fn check_layout(spec: &ArchSpec, p: &ParallelSection) -> Result<()> {
    let tp = p.tensor;
    let mut bad = Vec::new();
    let mut need = |what: &str, n: usize, key: &str, size: usize| {
        if n % size != 0 {
            bad.push(format!("{what} ({n}) is not divisible by {key} ({size})"));
        }
    };
    need("num_attention_heads", spec.num_heads, "parallel.tensor", tp);
    need("num_key_value_heads", spec.num_kv_heads, "parallel.tensor", tp);
    for l in &spec.layers {
        match l.mlp {
            MlpSpec::Dense { intermediate_size } => need("intermediate_size", intermediate_size, "parallel.tensor", tp),
            MlpSpec::Moe { num_experts, .. } => need("num_experts", num_experts, "parallel.expert", p.expert),
        }
    }
    bad.dedup();
    if bad.is_empty() {
        Ok(())
    } else {
        let tps: Vec<String> = (1..=spec.num_kv_heads).filter(|d| spec.num_kv_heads % d == 0).map(|d| d.to_string()).collect();
        Err(Error::model(format!(
            "parallel layout does not fit the {} architecture: {} (tensor sizes that divide the KV heads: {})",
            spec.family,
            bad.join("; "),
            tps.join(", ")
        )))
    }
}

/// Build the model on `device` from `plan`, with pretrained weights or a seeded random init as
/// `model.init` says, keeping the shards `layout` gives this rank.
pub fn build<B: TrainBackend>(plan: &ModelPlan, model: &ModelSection, layout: Layout, device: &B::Device) -> Result<CausalLm<B>> {
    let family = plan.family.clone();
    let naming = move |p: &str| family.checkpoint_name(p);
    match model.init {
        Init::Random => {
            let mut src = RandomInit { seed: model.seed, std: plan.spec.init_std };
            load_from(&mut src, &naming, plan, layout, device)
        }
        Init::Pretrained => {
            let dir = plan.dir.as_ref().ok_or_else(|| {
                Error::model("model.init = \"pretrained\" needs model.path (or set model.init = \"random\")")
            })?;
            let mut ckpt = Checkpoint::open(dir)?;
            let ignored: Vec<String> = ckpt.names().filter(|n| plan.family.ignores_tensor(n)).map(String::from).collect();
            for n in ignored {
                ckpt.allow_unused(&n);
            }
            if plan.spec.tie_word_embeddings {
                ckpt.allow_unused(&plan.family.checkpoint_name(&hf_names::weight(hf_names::LM_HEAD)));
            }
            load_from(&mut ckpt, &naming, plan, layout, device)
        }
    }
}

fn load_from<B: TrainBackend>(
    src: &mut dyn WeightSource,
    naming: &dyn Fn(&str) -> String,
    plan: &ModelPlan,
    layout: Layout,
    device: &B::Device,
) -> Result<CausalLm<B>> {
    let mut ld = Loader { source: src, device: device.clone(), naming };
    let model = CausalLm::load(&mut ld, &plan.spec, layout)?;
    ld.source.finish()?;
    Ok(model)
}
