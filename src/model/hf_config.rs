//! A Hugging Face `config.json`, as read from a model folder and/or written inline in the recipe
//! under `[model.config]`.
//!
//! Families read it through typed getters, so every error names where the config came from,
//! the key, and what was expected. Keys that transformers renamed between versions (v5 writes
//! `rope_parameters.rope_theta` and `num_local_experts` where the Hub's files have `rope_theta`
//! and `num_experts`) are read under either name.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct HfConfig {
    /// Where the values came from, for error messages.
    pub source: String,
    pub values: Map<String, Value>,
    /// The top-level keys a family has asked for (present or not), to tell a typo from a key
    /// it does not read ([`HfConfig::unread`]).
    read: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

/// Keys of Hugging Face configs that say nothing about the architecture trainer builds
/// (tokens, bookkeeping, inference and auxiliary-loss settings): never reported as unread.
const NOT_ARCHITECTURE: &[&str] = &[
    "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "bos_token_id", "eos_token_id",
    "pad_token_id", "use_cache", "attention_dropout", "max_window_layers", "sliding_window", "output_router_logits",
    "router_aux_loss_coef", "layer_types", "auto_map", "is_decoder", "return_dict",
];

impl HfConfig {
    /// A config of `values`, named `source` in messages.
    pub fn new(source: impl Into<String>, values: Map<String, Value>) -> Self {
        HfConfig { source: source.into(), values, read: Default::default() }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            Error::file(path, format!("not valid JSON at line {} column {}: {e}", e.line(), e.column()))
        })?;
        match value {
            Value::Object(values) => Ok(HfConfig { source: path.display().to_string(), values, read: Default::default() }),
            _ => Err(Error::file(path, "expected a JSON object of model settings")),
        }
    }

    /// Values from the recipe's `[model.config]` table.
    pub fn from_toml(table: &toml::Table, source: &str) -> Result<Self> {
        let value = serde_json::to_value(table)
            .map_err(|e| Error::model(format!("{source}: cannot read the inline config: {e}")))?;
        match value {
            Value::Object(values) => Ok(HfConfig { source: source.to_string(), values, read: Default::default() }),
            _ => Err(Error::Internal("a TOML table did not convert to a JSON object".into())),
        }
    }

    /// This config with `other`'s keys laid over it.
    pub fn overlay(mut self, other: &HfConfig) -> Self {
        for (k, v) in &other.values {
            self.values.insert(k.clone(), v.clone());
        }
        self.source = format!("{} + {}", self.source, other.source);
        self
    }

    fn lookup(&self, key: &str) -> Option<&Value> {
        let aliases: &[&str] = match key {
            "rope_theta" => &["rope_theta", "rope_parameters.rope_theta"],
            "num_experts" => &["num_experts", "num_local_experts"],
            _ => &[],
        };
        if let Ok(mut read) = self.read.lock() {
            for k in aliases.iter().copied().chain([key]) {
                read.insert(k.split('.').next().unwrap_or(k).to_string());
            }
        }
        let find = |k: &str| -> Option<&Value> {
            let mut parts = k.split('.');
            let mut v = self.values.get(parts.next()?)?;
            for p in parts {
                v = v.get(p)?;
            }
            (!v.is_null()).then_some(v)
        };
        if aliases.is_empty() {
            find(key)
        } else {
            aliases.iter().find_map(|k| find(k))
        }
    }

    /// `key`, which must be present.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.opt(key)?.ok_or_else(|| {
            Error::model(format!(
                "{}: `{key}` is missing; the model architecture needs it (set it in config.json \
                 or under [model.config] in the recipe)",
                self.source
            ))
        })
    }

    /// `key` if present (a JSON `null` counts as absent).
    pub fn opt<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.lookup(key) {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                Error::model(format!("{}: `{key}` = {v} is not valid: {e}", self.source))
            }),
        }
    }

    pub fn get_or<T: DeserializeOwned>(&self, key: &str, default: T) -> Result<T> {
        Ok(self.opt(key)?.unwrap_or(default))
    }

    pub fn model_type(&self) -> Result<String> {
        self.get("model_type")
    }

    /// Keys of `table` (the recipe's `[model.config]`) that no family read asked for, each with
    /// the nearest key that was (a typo such as `num_expert` for `num_experts`).
    pub fn unread(&self, table: &toml::Table) -> Vec<(String, Option<String>)> {
        let read = self.read.lock().map(|r| r.clone()).unwrap_or_default();
        table
            .keys()
            .filter(|k| !read.contains(*k) && !NOT_ARCHITECTURE.contains(&k.as_str()))
            .map(|k| {
                let near = read
                    .iter()
                    .map(|r| (strsim::jaro_winkler(k, r), r))
                    .filter(|(score, _)| *score >= 0.85)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, r)| r.clone());
                (k.clone(), near)
            })
            .collect()
    }

    /// An error for a setting this build does not support, naming the key.
    pub fn unsupported(&self, key: &str, why: &str) -> Error {
        Error::Unsupported(format!("{}: `{key}`: {why}", self.source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> HfConfig {
        HfConfig { source: "config.json".into(), values: serde_json::from_str(json).unwrap(), read: Default::default() }
    }

    #[test]
    fn reads_renamed_keys_under_both_names() {
        let v5 = cfg(r#"{"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "num_local_experts": 8}"#);
        let v4 = cfg(r#"{"rope_theta": 1e6, "num_experts": 8}"#);
        for c in [v5, v4] {
            assert_eq!(c.get::<f64>("rope_theta").unwrap(), 1e6);
            assert_eq!(c.get::<usize>("num_experts").unwrap(), 8);
        }
    }

    #[test]
    fn errors_name_the_source_and_key() {
        let c = cfg(r#"{"hidden_size": "big", "head_dim": null}"#);
        let e = c.get::<usize>("hidden_size").unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("`hidden_size`"), "{e}");
        let e = c.get::<usize>("vocab_size").unwrap_err().to_string();
        assert!(e.contains("`vocab_size` is missing"), "{e}");
        assert_eq!(c.opt::<usize>("head_dim").unwrap(), None);
    }

    #[test]
    fn unread_keys_name_the_nearest_read_one() {
        let c = cfg(r#"{"num_expert": 4, "hidden_size": 8, "dtype": "bfloat16", "frobnicate": 1}"#);
        let _ = c.opt::<usize>("num_experts");
        let _ = c.opt::<usize>("hidden_size");
        let table: toml::Table = toml::from_str("num_expert = 4\nhidden_size = 8\ndtype = \"bfloat16\"\nfrobnicate = 1").unwrap();
        assert_eq!(c.unread(&table), vec![("frobnicate".to_string(), None), ("num_expert".to_string(), Some("num_experts".to_string()))]);
    }
}
