//! The on-disk cache of [`prepare`](super::prepare)'s tokenised rows.
//!
//! Tokenising a large dataset takes minutes; a rerun of the same recipe on the same files
//! reads the result back instead. The cache file is named by a SHA-256 [`Key`] over everything
//! that changes the tokenised output: every source file's bytes (and its `data.datasets` entry),
//! the `tokenizer.json` bytes, and the recipe fields `data.datasets`, `data.val_split`,
//! `data.system`, `data.template`, `data.skip_bad_rows`, `model.model_name`,
//! `model.model_author`, `train.max_length`, `train.truncation` and `train.seed` (not
//! `data.num_proc`, `train.packing` or `train.padding_free`: they change nothing that is
//! cached). [`FORMAT`] is part of the key too: bump it when the tokenisation code changes what
//! it produces, so old files are missed rather than reused.
//!
//! Where: `$TRAINER_CACHE` if set (`off` turns the cache off), else
//! `<checkpoint.output_dir>/.cache/tokenized/`; see [`Cache::from_env`]. Files are written to
//! a temporary name and renamed, so a reader never sees half a file; a file that is truncated,
//! corrupt (checksum) or of another format is ignored with a note and rebuilt.
//!
//! # File layout
//!
//! Little-endian throughout: the magic `TRAINER-TOKENS\0\0`, the format (u32), then `pad_id`,
//! `skipped_bad_rows`, `dropped_too_long` (u64 each), then the training and the validation
//! rows, each as a count (u64) followed by, per row, its length `n` (u64), `n` ids (u32) and
//! `n` labels (i64); last, the SHA-256 of every byte before it.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::tokenize::Sample;
use crate::recipe::Recipe;

/// Version of the file layout and of the tokenisation it caches; part of the key.
pub const FORMAT: u32 = 1;

/// The environment variable naming the cache folder (or `off`).
pub const ENV: &str = "TRAINER_CACHE";

const MAGIC: &[u8; 16] = b"TRAINER-TOKENS\0\0";

/// Whether and where [`prepare_with`](super::prepare_with) caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cache {
    /// Neither read nor write a cache (tests, one-off runs).
    Off,
    /// Cache files in this folder (created when first written).
    Dir(PathBuf),
}

impl Cache {
    /// `$TRAINER_CACHE` when set (`off`, or empty, turns caching off), else
    /// `<checkpoint.output_dir>/.cache/tokenized`.
    pub fn from_env(recipe: &Recipe) -> Cache {
        Cache::from_setting(std::env::var_os(ENV).map(PathBuf::from), recipe)
    }

    fn from_setting(setting: Option<PathBuf>, recipe: &Recipe) -> Cache {
        match setting {
            Some(dir) if dir.as_os_str().is_empty() || dir.as_os_str() == "off" => Cache::Off,
            Some(dir) => Cache::Dir(dir),
            None => Cache::Dir(Path::new(&recipe.checkpoint.output_dir).join(".cache").join("tokenized")),
        }
    }
}

/// What a cache file holds: [`Prepared`](super::Prepared) without the fields taken from the
/// current recipe (`max_length`, `packing`, `padding_free`) or about this call (`cache_hit`,
/// `notes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub pad_id: u32,
    pub skipped_bad_rows: usize,
    pub dropped_too_long: usize,
}

/// The SHA-256 a cache file is named by, built up field by field. Every field is written with
/// its length first, so no two different inputs feed the hash the same bytes.
pub struct Key(Sha256);

impl Key {
    /// A key over [`FORMAT`] and the recipe fields that change the tokenised output.
    pub fn new(recipe: &Recipe) -> Key {
        let mut key = Key(Sha256::new());
        key.field("format", &FORMAT.to_le_bytes());
        let fields = serde_json::json!({
            "datasets": recipe.data.datasets,
            "val_split": recipe.data.val_split,
            "system": recipe.data.system,
            "template": recipe.data.template,
            "template_kwargs": recipe.data.template_kwargs,
            "ignore_empty_think": recipe.data.ignore_empty_think,
            "skip_bad_rows": recipe.data.skip_bad_rows,
            "model_name": recipe.model.model_name,
            "model_author": recipe.model.model_author,
            "max_length": recipe.train.max_length,
            "truncation": format!("{:?}", recipe.train.truncation),
            "seed": recipe.train.seed,
        });
        key.field("recipe", fields.to_string().as_bytes());
        key
    }

    /// Add a named blob (a file's path and then its bytes, say).
    pub fn field(&mut self, name: &str, bytes: &[u8]) {
        for part in [name.as_bytes(), bytes] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
    }

    /// Add a file: its name as given and its bytes.
    /// The chat template's text (a model's template may change under the same recipe).
    pub fn text(&mut self, text: &str) {
        self.field("template text", text.as_bytes());
    }

    pub fn file(&mut self, path: &Path) -> std::io::Result<()> {
        let bytes = std::fs::read(path)?;
        self.field(&path.to_string_lossy(), &bytes);
        Ok(())
    }

    /// The file name for this key: `<sha256 hex>.tokens`.
    pub fn file_name(self) -> String {
        let digest = self.0.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{hex}.tokens")
    }
}

/// Read a cache file. `Ok(None)`: no such file (a plain miss); `Err`: a file that is there but
/// cannot be used, with why (the caller notes it and rebuilds).
pub fn read(path: &Path) -> Result<Option<Cached>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => return Ok(None),
        Err(e) => return Err(format!("unreadable: {e}")),
    };
    decode(&bytes).map(Some)
}

/// Write a cache file atomically: a temporary file in the same folder, renamed over `path`.
pub fn write(path: &Path, cached: &Cached) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().map_or("cache".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&encode(cached))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn encode(c: &Cached) -> Vec<u8> {
    let tokens: usize = c.train.iter().chain(&c.val).map(Sample::len).sum();
    let mut out = Vec::with_capacity(64 + 12 * tokens + 8 * (c.train.len() + c.val.len()));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    for n in [u64::from(c.pad_id), c.skipped_bad_rows as u64, c.dropped_too_long as u64] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    for rows in [&c.train, &c.val] {
        out.extend_from_slice(&(rows.len() as u64).to_le_bytes());
        for row in rows {
            out.extend_from_slice(&(row.len() as u64).to_le_bytes());
            row.input_ids.iter().for_each(|id| out.extend_from_slice(&id.to_le_bytes()));
            row.labels.iter().for_each(|l| out.extend_from_slice(&l.to_le_bytes()));
        }
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

fn decode(bytes: &[u8]) -> Result<Cached, String> {
    if bytes.len() < MAGIC.len() + 4 + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a trainer token cache file".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err("checksum mismatch (truncated or corrupt)".into());
    }
    let mut r = Reader { bytes: &body[MAGIC.len()..] };
    let format = u32::from_le_bytes(r.take::<4>()?);
    if format != FORMAT {
        return Err(format!("format {format}, this build reads {FORMAT}"));
    }
    let pad_id = u32::try_from(r.u64()?).map_err(|_| "pad id out of range".to_string())?;
    let skipped_bad_rows = r.len()?;
    let dropped_too_long = r.len()?;
    let train = r.samples()?;
    let val = r.samples()?;
    if !r.bytes.is_empty() {
        return Err(format!("{} unexpected bytes after the rows", r.bytes.len()));
    }
    Ok(Cached { train, val, pad_id, skipped_bad_rows, dropped_too_long })
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let (head, rest) = self.bytes.split_first_chunk::<N>().ok_or("ends early")?;
        self.bytes = rest;
        Ok(*head)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    /// A count, checked against what is left so a corrupt count cannot ask for a huge vector.
    fn len(&mut self) -> Result<usize, String> {
        let n = self.u64()?;
        usize::try_from(n).ok().filter(|&n| n <= self.bytes.len()).ok_or_else(|| format!("count {n} exceeds the file"))
    }

    fn samples(&mut self) -> Result<Vec<Sample>, String> {
        let count = self.len()?;
        let mut rows = Vec::with_capacity(count);
        for _ in 0..count {
            let n = self.len()?;
            let input_ids = (0..n).map(|_| self.take::<4>().map(u32::from_le_bytes)).collect::<Result<_, _>>()?;
            let labels = (0..n).map(|_| self.take::<8>().map(i64::from_le_bytes)).collect::<Result<_, _>>()?;
            rows.push(Sample { input_ids, labels });
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::IGNORE;

    fn cached() -> Cached {
        let row = |ids: &[u32]| Sample {
            input_ids: ids.to_vec(),
            labels: ids.iter().enumerate().map(|(i, &t)| if i == 0 { IGNORE } else { i64::from(t) }).collect(),
        };
        Cached {
            train: vec![row(&[1, 2, 3]), row(&[70000, 5])],
            val: vec![row(&[9])],
            pad_id: 151643,
            skipped_bad_rows: 2,
            dropped_too_long: 3,
        }
    }

    #[test]
    fn files_round_trip_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("k.tokens");
        assert_eq!(read(&path), Ok(None), "no file is a plain miss");
        write(&path, &cached()).unwrap();
        assert_eq!(read(&path), Ok(Some(cached())));
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "the temporary file was renamed");

        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..good.len() - 5]).unwrap();
        assert!(read(&path).unwrap_err().contains("checksum"));
        let mut flipped = good.clone();
        flipped[40] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(read(&path).unwrap_err().contains("checksum"));
        std::fs::write(&path, b"{\"not\": \"ours\"}").unwrap();
        assert!(read(&path).unwrap_err().contains("not a trainer token cache"));
        // A well-formed file of another format: the checksum holds, the format does not.
        let mut other = good[..good.len() - 32].to_vec();
        other[16..20].copy_from_slice(&(FORMAT + 1).to_le_bytes());
        let sum = Sha256::digest(&other);
        other.extend_from_slice(&sum);
        std::fs::write(&path, &other).unwrap();
        assert!(read(&path).unwrap_err().contains("format"), "{:?}", read(&path));
    }

    #[test]
    fn corrupt_counts_are_errors_not_allocations() {
        let mut body = encode(&cached());
        body.truncate(body.len() - 32);
        // The training row count sits after magic, format and three u64s.
        let at = MAGIC.len() + 4 + 24;
        body[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let sum = Sha256::digest(&body);
        body.extend_from_slice(&sum);
        assert!(decode(&body).unwrap_err().contains("exceeds the file"));
    }

    #[test]
    fn keys_follow_the_recipe_fields_that_matter() {
        let name = |r: &Recipe| Key::new(r).file_name();
        let base = Recipe::default();
        let mut r = base.clone();
        assert_eq!(name(&r), name(&base));
        r.data.num_proc = 4;
        r.train.packing = true;
        assert_eq!(name(&r), name(&base), "threads and batch layout do not change the tokens");
        let changes: [fn(&mut Recipe); 6] = [
            |r| r.train.max_length = 17,
            |r| r.train.seed = 1,
            |r| r.data.system = Some("x".into()),
            |r| r.data.val_split = 0.5,
            |r| r.model.model_name = vec!["a".into()],
            |r| r.train.truncation = crate::recipe::Truncation::Left,
        ];
        for change in changes {
            let mut r = base.clone();
            change(&mut r);
            assert_ne!(name(&r), name(&base));
        }
        let mut a = Key::new(&base);
        a.field("ab", b"c");
        let mut b = Key::new(&base);
        b.field("a", b"bc");
        assert_ne!(a.file_name(), b.file_name(), "fields are length-prefixed");
    }

    #[test]
    fn location_from_the_environment_setting() {
        let mut r = Recipe::default();
        r.checkpoint.output_dir = "out".into();
        assert_eq!(Cache::from_setting(None, &r), Cache::Dir(PathBuf::from("out/.cache/tokenized")));
        assert_eq!(Cache::from_setting(Some("/c".into()), &r), Cache::Dir(PathBuf::from("/c")));
        assert_eq!(Cache::from_setting(Some("off".into()), &r), Cache::Off);
        assert_eq!(Cache::from_setting(Some("".into()), &r), Cache::Off);
    }
}
