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
}

impl HfConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            Error::file(path, format!("not valid JSON at line {} column {}: {e}", e.line(), e.column()))
        })?;
        match value {
            Value::Object(values) => Ok(HfConfig { source: path.display().to_string(), values }),
            _ => Err(Error::file(path, "expected a JSON object of model settings")),
        }
    }

    /// Values from the recipe's `[model.config]` table.
    pub fn from_toml(table: &toml::Table, source: &str) -> Result<Self> {
        let value = serde_json::to_value(table)
            .map_err(|e| Error::model(format!("{source}: cannot read the inline config: {e}")))?;
        match value {
            Value::Object(values) => Ok(HfConfig { source: source.to_string(), values }),
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

    /// An error for a setting this build does not support, naming the key.
    pub fn unsupported(&self, key: &str, why: &str) -> Error {
        Error::Unsupported(format!("{}: `{key}`: {why}", self.source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> HfConfig {
        HfConfig { source: "config.json".into(), values: serde_json::from_str(json).unwrap() }
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
}
