//! Writing a model as transformers' `save_pretrained` does: tensors in order, a new shard when
//! the next tensor would pass the maximum size, shards named `model-0000N-of-0000M.safetensors`
//! with `model.safetensors.index.json`, or one `model.safetensors` when everything fits in one.
//!
//! Only the shard being filled is in memory; each finished shard is written and flushed before
//! the next tensor is taken.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::recipe::DType;

/// The safetensors dtype of a recipe dtype.
pub fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::Bf16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
    }
}

/// `values` stored as `dtype`, little-endian (bf16 / f16 rounded to nearest even, as torch's
/// `.to()` does).
pub fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::Bf16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        DType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
    }
}

/// A tensor already stored as the file's dtype: name, shape, little-endian bytes.
pub type Encoded = (String, Vec<usize>, Vec<u8>);

/// Write `tensors` (stored as `dtype`) as one safetensors file with transformers' `format: pt`
/// metadata, flushed to disk.
pub fn write_encoded(path: &Path, tensors: &[Encoded], dtype: DType) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, bytes) in tensors {
        let view = TensorView::new(st_dtype(dtype), shape.clone(), bytes).map_err(|e| Error::Internal(format!("tensor `{name}`: {e}")))?;
        views.push((name.clone(), view));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(meta), path).map_err(|e| Error::file(path, format!("cannot write: {e}")))?;
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::file(path, format!("cannot flush to disk: {e}")))
}

/// Tensors streamed into shards of at most `max_bytes` each (a tensor larger than that gets a
/// shard of its own).
pub struct ShardWriter {
    dir: PathBuf,
    max_bytes: u64,
    dtype: DType,
    pending: Vec<Encoded>,
    pending_bytes: u64,
    /// Written shards (temporary names) and the tensors in each.
    written: Vec<(PathBuf, Vec<String>)>,
    total_bytes: u64,
}

impl ShardWriter {
    pub fn new(dir: &Path, max_bytes: u64, dtype: DType) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1),
            dtype,
            pending: Vec::new(),
            pending_bytes: 0,
            written: Vec::new(),
            total_bytes: 0,
        }
    }

    /// Add one tensor, stored in the writer's dtype.
    pub fn push(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<()> {
        let bytes = encode(values, self.dtype);
        let len = bytes.len() as u64;
        if !self.pending.is_empty() && self.pending_bytes + len > self.max_bytes {
            self.flush()?;
        }
        self.pending_bytes += len;
        self.total_bytes += len;
        self.pending.push((name.to_string(), shape.to_vec(), bytes));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(format!("shard-{}.partial", self.written.len() + 1));
        write_encoded(&path, &self.pending, self.dtype)?;
        let names = self.pending.drain(..).map(|(name, _, _)| name).collect();
        self.written.push((path, names));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Write the last shard, give every shard its final name and write the index. Returns the
    /// shard file names in order.
    pub fn finish(mut self) -> Result<Vec<String>> {
        self.flush()?;
        let n = self.written.len();
        let mut files = Vec::with_capacity(n);
        let mut weight_map = BTreeMap::new();
        for (i, (tmp, names)) in self.written.iter().enumerate() {
            let file = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
            let path = self.dir.join(&file);
            fs::rename(tmp, &path).map_err(|e| Error::file(&path, format!("cannot name the shard: {e}")))?;
            for name in names {
                weight_map.insert(name.clone(), file.clone());
            }
            files.push(file);
        }
        if n > 1 {
            let index = serde_json::json!({
                "metadata": { "total_size": self.total_bytes },
                "weight_map": weight_map,
            });
            let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Internal(e.to_string()))?;
            crate::run::checkpoint::write_synced(&self.dir.join("model.safetensors.index.json"), text.as_bytes())?;
        }
        Ok(files)
    }
}

/// `5GB`, `500MB`, `2GiB`, `123` (bytes): transformers' `max_shard_size` spellings (decimal
/// units are powers of 1000, binary ones of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000_000,
        "gb" => 1000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("`{s}`: unknown unit `{other}`; use B, KB, MB, GB, KiB, MiB or GiB")),
    };
    if !(value > 0.0) {
        return Err(format!("`{s}`: the shard size must be positive"));
    }
    Ok((value * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5MB"), Ok(1_500_000));
        assert_eq!(parse_size("300"), Ok(300));
        assert!(parse_size("5XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("big").is_err());
        assert!(parse_size("0GB").is_err());
    }

    #[test]
    fn shards_respect_the_maximum_and_the_index_lists_every_tensor_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), 100, DType::F32);
        // 16 bytes each (six fit in 100), then one of 400 bytes (its own shard), then one more.
        for i in 0..8 {
            w.push(&format!("t{i}"), &[4], &[i as f32; 4]).unwrap();
        }
        w.push("big", &[100], &[1.0; 100]).unwrap();
        w.push("last", &[2], &[2.0; 2]).unwrap();
        let files = w.finish().unwrap();
        let want: Vec<String> = (1..=4).map(|i| format!("model-{i:05}-of-00004.safetensors")).collect();
        assert_eq!(files, want);
        let index: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap()).unwrap();
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), 10);
        assert_eq!(index["metadata"]["total_size"], 8 * 16 + 400 + 8);
        for f in &files {
            let bytes = fs::read(dir.path().join(f)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let data: u64 = st.tensors().iter().map(|(_, v)| v.data().len() as u64).sum();
            assert!(data <= 100 || st.len() == 1, "{f}: {data} bytes in {} tensors", st.len());
            for (name, _) in st.tensors() {
                assert_eq!(map[&name], serde_json::json!(f));
            }
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".partial")).collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn one_shard_is_model_safetensors_without_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), 1 << 20, DType::Bf16);
        w.push("a", &[2], &[1.0, -2.5]).unwrap();
        assert_eq!(w.finish().unwrap(), vec!["model.safetensors"]);
        assert!(!dir.path().join("model.safetensors.index.json").exists());
        let bytes = fs::read(dir.path().join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().dtype(), Dtype::BF16);
    }
}
