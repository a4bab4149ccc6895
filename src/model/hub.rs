//! Where a recipe's `model.path` points: a local folder, or a Hugging Face hub id fetched with
//! `hf-hub` into its cache.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What to fetch from a hub repository.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fetch {
    /// `config.json` only (enough for `trainer check`).
    Config,
    /// Config, weights and tokenizer files.
    All,
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The local folder holding `model.path`'s files, fetching them if it is a hub id.
pub fn resolve_model_dir(path: &str, base: &Path, fetch: Fetch) -> Result<PathBuf> {
    let local = base.join(path);
    if local.is_dir() {
        return Ok(local);
    }
    if !looks_like_hub_id(path) {
        return Err(Error::file(
            local,
            "model.path: no such folder (expected a folder with config.json and *.safetensors, \
             or a hub id like \"Qwen/Qwen2.5-7B-Instruct\")",
        ));
    }
    fetch_from_hub(path, fetch)
}

fn fetch_from_hub(id: &str, fetch: Fetch) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(id.to_string());
    let cached_config = repo.get("config.json");
    let offline_help = |why: String| {
        let dir = cache.path().join(format!("models--{}", id.replace('/', "--")));
        Error::Unsupported(format!(
            "model.path = \"{id}\": not a local folder, and the Hugging Face hub could not serve it \
             ({why}). Download the model's config.json and *.safetensors on a machine with network \
             access and either set model.path to that folder, or place them in the hub cache at {}",
            dir.display()
        ))
    };
    if let Some(config) = &cached_config {
        if fetch == Fetch::Config || config.parent().is_some_and(has_weights) {
            return parent_dir(config);
        }
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| offline_help(e.to_string()))?;
    let remote = api.model(id.to_string());
    let config = remote.get("config.json").map_err(|e| offline_help(e.to_string()))?;
    if fetch == Fetch::All {
        let files = match remote.get("model.safetensors.index.json") {
            Ok(index) => {
                let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&index, e))?;
                let mut shards: Vec<String> = v["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|f| f.as_str().map(String::from)).collect())
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                shards
            }
            Err(_) => vec!["model.safetensors".to_string()],
        };
        for f in files.iter().map(String::as_str).chain(["tokenizer.json", "tokenizer_config.json", "generation_config.json"]) {
            let got = remote.get(f);
            if got.is_err() && f.ends_with(".safetensors") {
                return Err(offline_help(format!("{f}: {}", got.err().map(|e| e.to_string()).unwrap_or_default())));
            }
        }
    }
    parent_dir(&config)
}

fn has_weights(dir: &Path) -> bool {
    dir.join("model.safetensors").exists() || dir.join("model.safetensors.index.json").exists()
}

fn parent_dir(p: &Path) -> Result<PathBuf> {
    p.parent().map(Path::to_path_buf).ok_or_else(|| Error::Internal(format!("{} has no parent", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_hub_ids_from_paths() {
        assert!(looks_like_hub_id("Qwen/Qwen2.5-7B-Instruct"));
        assert!(!looks_like_hub_id("./models/qwen"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
    }

    #[test]
    fn a_missing_local_folder_names_the_path() {
        let e = resolve_model_dir("no/such/dir/here", Path::new("/tmp"), Fetch::Config).unwrap_err();
        assert!(e.to_string().contains("/tmp/no/such/dir/here"), "{e}");
    }
}
