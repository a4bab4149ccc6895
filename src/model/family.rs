//! A model family: how a `config.json` becomes an [`ArchSpec`], and how internal parameter paths
//! map to checkpoint tensor names. Families are registered in a [`Registry`]; one can be added
//! from outside the crate (see `examples/llama3_family.rs`).

use std::sync::Arc;

use super::hf_config::HfConfig;
use super::spec::ArchSpec;
use crate::error::{Error, Result};

pub trait ModelFamily: Send + Sync {
    /// Registry name, used by `model.family` in a recipe (e.g. `qwen3_moe`).
    fn name(&self) -> &'static str;
    /// One line for `trainer models`.
    fn description(&self) -> &'static str;
    /// The `model_type` values of config.json this family reads.
    fn model_types(&self) -> &'static [&'static str];
    /// Compile a config into the architecture; unsupported options fail here, with a sentence.
    fn arch(&self, config: &HfConfig) -> Result<ArchSpec>;
    /// Checkpoint name of an internal parameter path. The module tree follows the Hugging Face
    /// key paths, so this is the identity unless a family's checkpoints differ.
    fn checkpoint_name(&self, path: &str) -> String {
        path.to_string()
    }
    /// Tensors a checkpoint may carry that the model recomputes (old rotary buffers).
    fn ignores_tensor(&self, name: &str) -> bool {
        name.ends_with("rotary_emb.inv_freq")
    }
    /// The transformers class an exported `config.json` names in `architectures` when the
    /// base config has none (a model built from an inline `[model.config]`).
    fn hf_architecture(&self) -> Option<&'static str> {
        None
    }
}

/// The families a binary knows.
#[derive(Clone)]
pub struct Registry {
    families: Vec<Arc<dyn ModelFamily>>,
}

impl Registry {
    pub fn empty() -> Self {
        Registry { families: Vec::new() }
    }

    /// The families shipped with trainer.
    pub fn builtin() -> Self {
        let mut r = Registry::empty();
        r.register(super::qwen2::Qwen2);
        r.register(super::qwen2_moe::Qwen2Moe);
        r.register(super::qwen3::Qwen3);
        r.register(super::qwen3_moe::Qwen3Moe);
        r
    }

    /// Add a family; a later registration with the same name replaces the earlier one.
    pub fn register(&mut self, family: impl ModelFamily + 'static) -> &mut Self {
        self.families.retain(|f| f.name() != family.name());
        self.families.push(Arc::new(family));
        self
    }

    pub fn families(&self) -> impl Iterator<Item = &Arc<dyn ModelFamily>> {
        self.families.iter()
    }

    /// The family named `family` if given, else the one reading `model_type`.
    pub fn resolve(&self, family: Option<&str>, model_type: &str) -> Result<Arc<dyn ModelFamily>> {
        let found = match family {
            Some(name) => self.families.iter().find(|f| f.name() == name),
            None => self.families.iter().find(|f| f.model_types().contains(&model_type)),
        };
        found.cloned().ok_or_else(|| {
            let known: Vec<String> = self
                .families
                .iter()
                .map(|f| format!("{} (model_type {})", f.name(), f.model_types().join(", ")))
                .collect();
            let what = match family {
                Some(n) => format!("model.family = \"{n}\" is not a registered family"),
                None => format!("model_type \"{model_type}\" is not supported"),
            };
            Error::Unsupported(format!("{what}; registered: {}", known.join("; ")))
        })
    }
}
