//! `data.datasets` entries that name a Hugging Face hub dataset (`org/name`, optionally
//! `org/name#N`) rather than a local file: the repo's data files are listed, the training split
//! picked ([`select_files`]), downloaded into the hub cache with `hf-hub` and read as local
//! sources.
//!
//! Without network the files already in the hub cache (`$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`) are used when a snapshot of the dataset is there; otherwise the
//! error names the dataset and says to download its files and name them in `data.datasets`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// File types read as data, most preferred first: when a repo has several (raw `.jsonl` and a
/// Parquet conversion, say) only the first present is taken, so no row is read twice.
const DATA_EXTENSIONS: [&str; 3] = ["parquet", "jsonl", "json"];

/// `.json` files in dataset repos that describe the data rather than hold it.
const METADATA_FILES: [&str; 4] = ["dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"];

/// Words that name the training split, and the other splits, in file and folder names.
const TRAIN_SPLIT: [&str; 2] = ["train", "training"];
const OTHER_SPLITS: [&str; 8] = ["validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation"];

/// Whether a `data.datasets` source (without `#N`) has the form of a hub dataset id,
/// `org/name`: two non-empty parts of letters, digits, `-`, `_`, `.`, not a relative path
/// (`./x`) and not a file name with a data extension (`dir/a.jsonl` is a missing file).
pub fn looks_like_dataset_id(source: &str) -> bool {
    let parts: Vec<&str> = source.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
        && parts.iter().all(|p| p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        && extension(source).is_none_or(|e| !DATA_EXTENSIONS.contains(&e.as_str()))
}

/// The data files to read from a dataset repo's file list (paths inside the repo), sorted:
/// - data files are `.parquet`, `.jsonl` and `.json` (not the `datasets` library's metadata
///   files such as `dataset_info.json`);
/// - of the formats present only the most preferred is taken (Parquet, then JSONL, then JSON);
/// - when files are named by split (`data/train-00000-of-00001.parquet`, `train.jsonl`,
///   `train/0.parquet`, `test.jsonl`), only the training split's files are taken; a repo whose
///   files name splits but none of them `train` is an error; files that name no split are all
///   taken.
///
/// The error says what the repo has instead.
pub fn select_files(files: &[String]) -> std::result::Result<Vec<String>, String> {
    let data: Vec<&String> = files
        .iter()
        .filter(|f| extension(f).is_some_and(|e| DATA_EXTENSIONS.contains(&e.as_str())))
        .filter(|f| !METADATA_FILES.contains(&file_name(f)))
        .collect();
    let Some(format) = DATA_EXTENSIONS.iter().find(|e| data.iter().any(|f| extension(f).as_deref() == Some(**e))) else {
        return Err(format!("has no .parquet, .jsonl or .json data files (it has: {})", listing(files)));
    };
    let data: Vec<&String> = data.into_iter().filter(|f| extension(f).as_deref() == Some(*format)).collect();
    let train: Vec<&String> = data.iter().copied().filter(|f| names_split(f, &TRAIN_SPLIT)).collect();
    let mut chosen = if !train.is_empty() {
        train
    } else if data.iter().any(|f| names_split(f, &OTHER_SPLITS)) {
        return Err(format!(
            "names its .{format} files by split but has no `train` split (it has: {})",
            listing(&data.iter().map(|f| f.to_string()).collect::<Vec<_>>())
        ));
    } else {
        data
    };
    chosen.sort();
    Ok(chosen.into_iter().cloned().collect())
}

/// Where the hub is and where its cache is; [`Hub::from_env`] reads `HF_HOME` and
/// `HF_ENDPOINT` as `hf-hub` does.
#[derive(Debug, Clone)]
pub struct Hub {
    pub cache: hf_hub::Cache,
    /// The hub's address; `None`: hf-hub's default (or `HF_ENDPOINT`).
    pub endpoint: Option<String>,
}

impl Hub {
    pub fn from_env() -> Hub {
        Hub { cache: hf_hub::Cache::from_env(), endpoint: std::env::var("HF_ENDPOINT").ok() }
    }

    /// The local files of dataset `id`: listed and downloaded from the hub, or, when the hub
    /// cannot be reached, those of a snapshot already in the cache.
    pub fn fetch(&self, id: &str) -> Result<Vec<PathBuf>> {
        let why = match self.fetch_remote(id) {
            Ok(files) => return Ok(files),
            Err(Remote::Selection(what)) => return Err(Error::data(format!("data.datasets: hub dataset `{id}` {what}"))),
            Err(Remote::Unreachable(why)) => why,
        };
        match self.cached_snapshot(id) {
            Some(files) if !files.is_empty() => Ok(files),
            _ => Err(Error::Unsupported(format!(
                "data.datasets: `{id}` is not a local file and the Hugging Face hub could not serve it as a \
                 dataset ({why}), nor is it in the hub cache at {}. Download the dataset's data files \
                 (.parquet, .jsonl or .json) on a machine with network access and point data.datasets at \
                 the local file(s), e.g. `data/train.parquet` (keep a `#N` suffix if you had one)",
                self.cache.path().join(folder_name(id)).display()
            ))),
        }
    }

    fn fetch_remote(&self, id: &str) -> std::result::Result<Vec<PathBuf>, Remote> {
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(self.cache.clone()).with_progress(false);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder.build().map_err(|e| Remote::Unreachable(e.to_string()))?;
        let repo = api.dataset(id.to_string());
        let info = repo.info().map_err(|e| Remote::Unreachable(e.to_string()))?;
        let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let chosen = select_files(&names).map_err(Remote::Selection)?;
        chosen.iter().map(|f| repo.get(f).map_err(|e| Remote::Unreachable(format!("{f}: {e}")))).collect()
    }

    /// The selected files of the snapshot `refs/main` points at in the cache, if there is one.
    fn cached_snapshot(&self, id: &str) -> Option<Vec<PathBuf>> {
        let repo = self.cache.path().join(folder_name(id));
        let commit = std::fs::read_to_string(repo.join("refs").join("main")).ok()?;
        let snapshot = repo.join("snapshots").join(commit.trim());
        let mut files = Vec::new();
        list_files(&snapshot, "", &mut files);
        let chosen = select_files(&files).ok()?;
        Some(chosen.iter().map(|f| snapshot.join(f)).collect())
    }
}

enum Remote {
    /// The hub (or a download) failed: try the cache.
    Unreachable(String),
    /// The hub answered, but the repo has nothing to read.
    Selection(String),
}

/// hf-hub's cache folder of a dataset repo.
fn folder_name(id: &str) -> String {
    format!("datasets--{}", id.replace('/', "--"))
}

/// Paths under `dir`, relative, with `/` separators.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let path = entry.path();
        if path.is_dir() {
            list_files(&path, &rel, out);
        } else {
            out.push(rel);
        }
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn extension(path: &str) -> Option<String> {
    let name = file_name(path);
    name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())
}

/// Whether a split word is a whole word of the path: words are split at anything that is not
/// a letter (`data/train-00000-of-00001.parquet` has `data`, `train`, `of`, `parquet`).
fn names_split(path: &str, words: &[&str]) -> bool {
    path.to_ascii_lowercase().split(|c: char| !c.is_ascii_alphabetic()).any(|w| words.contains(&w))
}

fn listing(files: &[String]) -> String {
    if files.is_empty() {
        return "no files".into();
    }
    let shown: Vec<&str> = files.iter().take(8).map(String::as_str).collect();
    let more = files.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{}, and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tells_dataset_ids_from_paths() {
        assert!(looks_like_dataset_id("AI-ModelScope/alpaca-gpt4-data-en"));
        assert!(looks_like_dataset_id("tatsu-lab/alpaca"));
        assert!(looks_like_dataset_id("org/name.v2"));
        for path in ["./data/a", "/abs/x", "a/b/c", "data/train.jsonl", "data/train.parquet", "alpaca", "org/", ".x/y"] {
            assert!(!looks_like_dataset_id(path), "{path}");
        }
    }

    #[test]
    fn the_train_split_is_preferred_when_files_are_named_by_split() {
        let repo = names(&[
            ".gitattributes",
            "README.md",
            "data/validation-00000-of-00001.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "data/train-00000-of-00002.parquet",
        ]);
        assert_eq!(
            select_files(&repo).unwrap(),
            ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"],
            "train shards only, in order"
        );
        let by_folder = names(&["train/0000.parquet", "test/0000.parquet", "dataset_dict.json"]);
        assert_eq!(select_files(&by_folder).unwrap(), ["train/0000.parquet"]);
        let plain = names(&["train.jsonl", "test.jsonl", "eval.jsonl"]);
        assert_eq!(select_files(&plain).unwrap(), ["train.jsonl"]);
    }

    #[test]
    fn files_without_split_names_are_all_taken_in_one_format() {
        let repo = names(&["b.jsonl", "a.jsonl", "dataset_info.json", "README.md"]);
        assert_eq!(select_files(&repo).unwrap(), ["a.jsonl", "b.jsonl"]);
        // Raw JSONL and a Parquet conversion: Parquet only, so no row is read twice.
        let both = names(&["alpaca_data.json", "data/train-00000-of-00001.parquet", "raw/train.jsonl"]);
        assert_eq!(select_files(&both).unwrap(), ["data/train-00000-of-00001.parquet"]);
        // `training` names the train split; `constraint` does not contain the word `train`.
        let words = names(&["training_set.json", "constraints.json"]);
        assert_eq!(select_files(&words).unwrap(), ["training_set.json"]);
    }

    #[test]
    fn repos_without_usable_files_say_what_they_have() {
        let err = select_files(&names(&["README.md", "data.csv", "dataset_infos.json"])).unwrap_err();
        assert!(err.contains("no .parquet, .jsonl or .json data files") && err.contains("data.csv"), "{err}");
        let err = select_files(&names(&["test.jsonl", "validation.jsonl"])).unwrap_err();
        assert!(err.contains("no `train` split") && err.contains("test.jsonl, validation.jsonl"), "{err}");
    }

    /// A hub that cannot be reached: a closed port on this machine.
    fn offline(cache: &Path) -> Hub {
        Hub { cache: hf_hub::Cache::new(cache.to_path_buf()), endpoint: Some("http://127.0.0.1:9".into()) }
    }

    #[test]
    fn offline_without_a_cached_copy_says_to_download() {
        let dir = tempfile::tempdir().unwrap();
        let err = offline(dir.path()).fetch("tatsu-lab/alpaca").unwrap_err().to_string();
        assert!(err.contains("`tatsu-lab/alpaca` is not a local file"), "{err}");
        assert!(err.contains("point data.datasets at the local file(s)"), "{err}");
        assert!(err.contains(&dir.path().join("datasets--tatsu-lab--alpaca").display().to_string()), "{err}");
    }

    #[test]
    fn offline_with_a_cached_snapshot_reads_its_train_files() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("datasets--org--name");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let snapshot = repo.join("snapshots/abc123/data");
        std::fs::create_dir_all(&snapshot).unwrap();
        for f in ["train-00000-of-00001.jsonl", "test-00000-of-00001.jsonl"] {
            std::fs::write(snapshot.join(f), "{\"instruction\": \"Q\", \"output\": \"A\"}\n").unwrap();
        }
        let got = offline(dir.path()).fetch("org/name").unwrap();
        assert_eq!(got, [snapshot.join("train-00000-of-00001.jsonl")]);
    }
}
