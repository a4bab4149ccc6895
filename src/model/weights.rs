//! Where a model's weights come from: a Hugging Face safetensors checkpoint (single file or
//! sharded with `model.safetensors.index.json`, memory-mapped and read one tensor at a time) or
//! a seeded random initialisation of the same shapes.
//!
//! Every source hands out one tensor at a time as f32 on the host, already cut to the slice a
//! layer owns, so host memory stays near one tensor whatever the checkpoint's size.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// One tensor on the host, in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// How a source should fill a tensor it has no file for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitKind {
    /// A projection or embedding: normal with the config's `initializer_range`.
    Normal,
    /// A norm scale: ones.
    Ones,
    /// A bias: zeros.
    Zeros,
}

/// A request for one named tensor.
#[derive(Debug, Clone)]
pub struct TensorRequest<'a> {
    /// Hugging Face name ([`hf_names`](super::hf_names)).
    pub name: &'a str,
    /// The full shape in the checkpoint.
    pub shape: &'a [usize],
    /// The part this rank owns: `(dim, range)` of the full tensor, or all of it.
    pub slice: Option<(usize, Range<usize>)>,
    pub init: InitKind,
}

/// A provider of named tensors.
pub trait WeightSource {
    fn tensor(&mut self, req: TensorRequest<'_>) -> Result<HostTensor>;

    /// Several tensors at once, in order (the experts of a layer): a source that can make them
    /// side by side does.
    fn tensors(&mut self, reqs: &[TensorRequest<'_>]) -> Result<Vec<HostTensor>> {
        reqs.iter().map(|r| self.tensor(r.clone())).collect()
    }

    /// `reqs`' values (none sliced) handed to `sink` piece by piece, from any thread: for a
    /// consumer that lays them out itself, without a whole f32 copy of each tensor. By default
    /// from [`tensors`](Self::tensors).
    fn fill(&mut self, reqs: &[TensorRequest<'_>], sink: &Sink<'_>) -> Result<()> {
        let made = self.tensors(reqs)?;
        let pieces: Vec<(usize, usize, &[f32])> =
            made.iter().enumerate().flat_map(|(k, t)| t.data.chunks(RANDOM_CHUNK).enumerate().map(move |(c, v)| (k, c * RANDOM_CHUNK, v))).collect();
        parallel_for(pieces, |(k, offset, values)| sink(k, offset, values));
        Ok(())
    }

    /// Called once the model is built: a checkpoint reports tensors nobody asked for.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Where [`WeightSource::fill`] puts values: `(request, offset, values)`, `values` starting at
/// `offset` of the request's tensor in its stored (row-major) order. Called from several
/// threads at once, each place of each tensor exactly once.
pub type Sink<'a> = dyn Fn(usize, usize, &[f32]) + Sync + 'a;

/// Cut `(dim, range)` out of a row-major tensor.
pub fn slice_host(t: HostTensor, slice: Option<(usize, Range<usize>)>) -> HostTensor {
    let Some((dim, range)) = slice else { return t };
    let outer: usize = t.shape[..dim].iter().product();
    let inner: usize = t.shape[dim + 1..].iter().product();
    let full = t.shape[dim];
    let mut data = Vec::with_capacity(outer * range.len() * inner);
    for o in 0..outer {
        let base = o * full * inner;
        data.extend_from_slice(&t.data[base + range.start * inner..base + range.end * inner]);
    }
    let mut shape = t.shape;
    shape[dim] = range.len();
    HostTensor { shape, data }
}

/// Seeded random weights: each tensor's values depend only on the seed and the tensor's name,
/// so every rank of a sharded run draws the same full tensor and keeps its slice.
pub struct RandomInit {
    pub seed: u64,
    pub std: f64,
}

impl WeightSource for RandomInit {
    fn tensor(&mut self, req: TensorRequest<'_>) -> Result<HostTensor> {
        let mut t = self.tensors(&[req])?;
        Ok(t.pop().expect("one tensor asked, one made"))
    }

    fn tensors(&mut self, reqs: &[TensorRequest<'_>]) -> Result<Vec<HostTensor>> {
        let mut data: Vec<Vec<f32>> = reqs.iter().map(|r| vec![0.0f32; r.shape.iter().product()]).collect();
        // Chunks of 1 Mi values of every tensor asked for, on all cores, each chunk its own
        // stream of its tensor's generator: the values depend on the seed and the name alone (a
        // 7B model is 7.6e9 values, ~1 min on one core; an expert's tensor is 1-2 chunks, so
        // the experts of a layer are made together).
        let mut chunks: Vec<(RandomChunk, &mut [f32])> = Vec::new();
        for (req, values) in reqs.iter().zip(data.iter_mut()) {
            chunks.extend(values.chunks_mut(RANDOM_CHUNK).enumerate().map(|(i, c)| (self.chunk(req, i), c)));
        }
        parallel_for(chunks, |(chunk, values)| chunk.make(values));
        Ok(reqs.iter().zip(data).map(|(req, data)| slice_host(HostTensor { shape: req.shape.to_vec(), data }, req.slice.clone())).collect())
    }

    /// The values [`tensors`](Self::tensors) makes, a chunk at a time into reused buffers: no
    /// fresh f32 pages (first touches of fresh pages were most of a large model's
    /// build).
    fn fill(&mut self, reqs: &[TensorRequest<'_>], sink: &Sink<'_>) -> Result<()> {
        let mut chunks: Vec<(usize, RandomChunk, usize)> = Vec::new();
        for (k, req) in reqs.iter().enumerate() {
            let n: usize = req.shape.iter().product();
            chunks.extend((0..n.div_ceil(RANDOM_CHUNK)).map(|i| (k, self.chunk(req, i), RANDOM_CHUNK.min(n - i * RANDOM_CHUNK))));
        }
        // Buffers outlive the threads of one fill (each fill starts its own): a model's build
        // touches a few of them, not a fresh one a thread a projection.
        static BUFFERS: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());
        let lock = || BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        parallel_for(chunks, |(k, chunk, len)| {
            let mut buffer = lock().pop().unwrap_or_default();
            buffer.resize(len, 0.0);
            chunk.make(&mut buffer[..len]);
            sink(k, chunk.index * RANDOM_CHUNK, &buffer[..len]);
            lock().push(buffer);
        });
        Ok(())
    }
}

impl RandomInit {
    /// Chunk `index` of `req`'s values.
    fn chunk(&self, req: &TensorRequest<'_>, index: usize) -> RandomChunk {
        // Uniform with the requested standard deviation: cheap, and only the scale matters for
        // benchmarks and tests.
        let bound = (self.std * 3f64.sqrt()) as f32;
        RandomChunk { init: req.init, root: self.seed ^ fnv1a(req.name), bound, index }
    }
}

/// One [`RANDOM_CHUNK`] of a random tensor: its own stream of the tensor's generator.
#[derive(Debug, Clone, Copy)]
struct RandomChunk {
    init: InitKind,
    root: u64,
    bound: f32,
    index: usize,
}

impl RandomChunk {
    fn make(&self, values: &mut [f32]) {
        match self.init {
            InitKind::Ones => values.fill(1.0),
            InitKind::Zeros => values.fill(0.0),
            InitKind::Normal => {
                let mut rng = ChaCha8Rng::seed_from_u64(self.root);
                rng.set_stream(self.index as u64);
                let a = self.bound;
                values.iter_mut().for_each(|v| *v = rng.random_range(-a..a));
            }
        }
    }
}

/// Where a model build's host time goes, summed over its tensors since the process started:
/// making or reading the values (`source`), converting them to the backend's type and handing
/// them to the device (`upload`: one pass, the values written where the copy to the device reads
/// them). `trainer bench` reports them.
pub mod build_time {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    static NANOS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

    /// The phases, in [`seconds`]' order.
    pub const PHASES: [&str; 2] = ["source", "upload"];

    /// `f`, its time added to phase `phase` (an index of [`PHASES`]).
    pub fn timed<T>(phase: usize, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        NANOS[phase].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Seconds in each phase so far.
    pub fn seconds() -> [f64; 2] {
        std::array::from_fn(|i| NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9)
    }
}

/// Values per random stream of [`RandomInit`].
const RANDOM_CHUNK: usize = 1 << 20;

/// `f` over `items` on all cores (the one helper, kept where the device uploads use it too).
pub(crate) use kernels_cubecl::parallel_for;

/// A stable 64-bit hash of a name (FNV-1a), for per-tensor random streams.
pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// A Hugging Face safetensors checkpoint in a folder.
pub struct Checkpoint {
    dir: PathBuf,
    /// Tensor name → file (relative to `dir`).
    index: BTreeMap<String, String>,
    maps: HashMap<String, Mmap>,
    used: BTreeSet<String>,
    /// Tensors the model derives elsewhere and that may be present or absent (tied heads).
    optional: BTreeSet<String>,
}

impl Checkpoint {
    /// Open `dir/model.safetensors.index.json` if present, else every `*.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let index = if index_path.exists() {
            read_index(&index_path)?
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::file(dir, format!("cannot list the model folder: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().is_some_and(|x| x == "safetensors")
                        && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("model"))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::file(
                    dir,
                    "no weights: expected model.safetensors or model.safetensors.index.json \
                     (or set model.init = \"random\" to build the architecture without weights)",
                ));
            }
            let mut index = BTreeMap::new();
            for f in files {
                let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let map = map_file(&f)?;
                let st = parse(&f, &map)?;
                for k in st.names() {
                    index.insert(k.to_string(), name.clone());
                }
            }
            index
        };
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            index,
            maps: HashMap::new(),
            used: BTreeSet::new(),
            optional: BTreeSet::new(),
        })
    }

    /// Names of every tensor in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Allow `name` to be present without being read (a tied LM head saved anyway).
    pub fn allow_unused(&mut self, name: &str) {
        self.optional.insert(name.to_string());
    }

    fn map(&mut self, file: &str) -> Result<&Mmap> {
        if !self.maps.contains_key(file) {
            let m = map_file(&self.dir.join(file))?;
            self.maps.insert(file.to_string(), m);
        }
        Ok(&self.maps[file])
    }
}

/// What a tensor of a checkpoint was when a run read it: enough to tell later whether the same
/// base weights are still there (`base_weights.json` of a run; export checks it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorPrint {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// SHA-256 of the tensor's bytes as stored.
    pub sha256: String,
}

impl Checkpoint {
    /// The stored dtype and shape of `name`, from the file header.
    pub fn header(&mut self, name: &str) -> Result<(Dtype, Vec<usize>)> {
        let file = self.file_of(name)?;
        let path = self.dir.join(&file);
        let map = self.map(&file)?;
        let st = parse(&path, map)?;
        let view = st.tensor(name).map_err(|e| Error::file(&path, format!("tensor `{name}`: {e}")))?;
        Ok((view.dtype(), view.shape().to_vec()))
    }

    /// Tensor `name` in f32 with the shape its file gives (for tensors outside the
    /// architecture's table, such as old rotary buffers, copied as they are).
    pub fn read_as_stored(&mut self, name: &str) -> Result<HostTensor> {
        let (_, shape) = self.header(name)?;
        self.tensor(TensorRequest { name, shape: &shape, slice: None, init: InitKind::Zeros })
    }

    fn file_of(&self, name: &str) -> Result<String> {
        self.index
            .get(name)
            .cloned()
            .ok_or_else(|| Error::model(format!("{}: tensor `{name}` is not in the checkpoint", self.dir.display())))
    }

    /// A [`TensorPrint`] of every tensor, hashed on all cores (a 15 GB checkpoint takes seconds).
    pub fn fingerprints(&mut self) -> Result<BTreeMap<String, TensorPrint>> {
        let files: BTreeSet<String> = self.index.values().cloned().collect();
        let mut out = BTreeMap::new();
        for file in files {
            let mut slots: Vec<(String, Option<Result<TensorPrint>>)> =
                self.index.iter().filter(|(_, f)| **f == file).map(|(n, _)| (n.clone(), None)).collect();
            let path = self.dir.join(&file);
            let map = self.map(&file)?;
            let st = parse(&path, map)?;
            parallel_for(slots.iter_mut().collect(), |(name, slot)| {
                *slot = Some(
                    st.tensor(name)
                        .map(|view| TensorPrint {
                            dtype: format!("{:?}", view.dtype()),
                            shape: view.shape().to_vec(),
                            sha256: format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(view.data())),
                        })
                        .map_err(|e| Error::file(&path, format!("tensor `{name}` listed but not readable: {e}"))),
                );
            });
            for (name, print) in slots {
                let print = print.unwrap_or_else(|| Err(Error::Internal(format!("tensor `{name}` was not hashed"))))?;
                out.insert(name, print);
            }
        }
        Ok(out)
    }
}

fn map_file(path: &Path) -> Result<Mmap> {
    let f = File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    // SAFETY: the file is opened read-only; a checkpoint modified while training runs is
    // outside what we promise, as for every framework that maps weights.
    unsafe { Mmap::map(&f) }.map_err(|e| Error::file(path, format!("cannot map: {e}")))
}

fn parse<'a>(path: &Path, map: &'a Mmap) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(map)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let idx: Index = serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not a safetensors index (needs a `weight_map` object): {e}")))?;
    Ok(idx.weight_map)
}

pub(crate) fn to_f32(dtype: Dtype, bytes: &[u8], name: &str, file: &Path) -> Result<Vec<f32>> {
    let words = |n: usize| bytes.chunks_exact(n);
    Ok(match dtype {
        Dtype::F32 => words(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => words(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => words(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => words(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        // Token ids and labels in fixtures and batches; exact below 2^24.
        Dtype::I64 => words(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(Error::file(
                file,
                format!("tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16"),
            ))
        }
    })
}

impl WeightSource for Checkpoint {
    fn tensor(&mut self, req: TensorRequest<'_>) -> Result<HostTensor> {
        let Some(file) = self.index.get(req.name).cloned() else {
            return Err(Error::model(format!(
                "{}: tensor `{}` (shape {:?}) is missing from the checkpoint{}",
                self.dir.display(),
                req.name,
                req.shape,
                closest(req.name, self.index.keys())
            )));
        };
        let path = self.dir.join(&file);
        let map = self.map(&file)?;
        let st = parse(&path, map)?;
        let view = st.tensor(req.name).map_err(|e| {
            Error::file(&path, format!("tensor `{}` listed in the index but not readable: {e}", req.name))
        })?;
        if view.shape() != req.shape {
            return Err(Error::model(format!(
                "{}: tensor `{}` has shape {:?}; the config.json architecture expects {:?}",
                path.display(),
                req.name,
                view.shape(),
                req.shape
            )));
        }
        let data = to_f32(view.dtype(), view.data(), req.name, &path)?;
        self.used.insert(req.name.to_string());
        Ok(slice_host(HostTensor { shape: req.shape.to_vec(), data }, req.slice))
    }

    fn finish(&mut self) -> Result<()> {
        let extra: Vec<&String> = self
            .index
            .keys()
            .filter(|k| !self.used.contains(*k) && !self.optional.contains(*k))
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = extra.iter().take(5).map(|s| s.as_str()).collect();
        Err(Error::model(format!(
            "{}: {} tensor(s) in the checkpoint are not part of the architecture in config.json, \
             e.g. {}; is `model_type` or `num_hidden_layers` right?",
            self.dir.display(),
            extra.len(),
            shown.join(", ")
        )))
    }
}

fn closest<'a>(name: &str, names: impl Iterator<Item = &'a String>) -> String {
    names
        .map(|n| (strsim::normalized_levenshtein(name, n), n))
        .filter(|(s, _)| *s > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| format!("; the checkpoint has `{n}`"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_rows_and_columns() {
        let t = HostTensor { shape: vec![2, 3], data: vec![0., 1., 2., 3., 4., 5.] };
        assert_eq!(slice_host(t.clone(), Some((0, 1..2))).data, vec![3., 4., 5.]);
        let c = slice_host(t, Some((1, 1..3)));
        assert_eq!((c.shape, c.data), (vec![2, 2], vec![1., 2., 4., 5.]));
    }

    #[test]
    fn random_init_is_seeded_per_name_and_shards_consistently() {
        let mut a = RandomInit { seed: 7, std: 0.02 };
        let req = |slice| TensorRequest { name: "w", shape: &[4, 6], slice, init: InitKind::Normal };
        let full = a.tensor(req(None)).unwrap();
        assert_eq!(full, a.tensor(req(None)).unwrap());
        let part = a.tensor(req(Some((1, 3..6)))).unwrap();
        assert_eq!(part, slice_host(full.clone(), Some((1, 3..6))));
        let other = RandomInit { seed: 8, std: 0.02 }.tensor(req(None)).unwrap();
        assert_ne!(full, other);
        let std = (full.data.iter().map(|x| x * x).sum::<f32>() / 24.0).sqrt();
        assert!(std > 0.005 && std < 0.05, "{std}");
    }

    #[test]
    fn random_init_over_several_streams_is_seeded_and_has_no_repeated_chunks() {
        // Three chunks (the last partial): each its own stream, the same on every call.
        let n = 2 * RANDOM_CHUNK + 1000;
        let shape = [n];
        let req = || TensorRequest { name: "big", shape: &shape, slice: None, init: InitKind::Normal };
        let a = RandomInit { seed: 3, std: 0.02 }.tensor(req()).unwrap();
        assert_eq!(a, RandomInit { seed: 3, std: 0.02 }.tensor(req()).unwrap());
        assert_ne!(a.data[..1000], a.data[RANDOM_CHUNK..RANDOM_CHUNK + 1000]);
        assert_ne!(a.data[..1000], a.data[2 * RANDOM_CHUNK..]);
        let bound = 0.02 * 3f32.sqrt() * 1.0001;
        assert!(a.data.iter().all(|v| v.abs() <= bound));
        let std = (a.data.iter().map(|x| (x * x) as f64).sum::<f64>() / n as f64).sqrt();
        assert!((std - 0.02).abs() < 2e-4, "{std}");
    }

    /// What `fill` hands a sink, gathered into whole tensors.
    fn filled(source: &mut dyn WeightSource, reqs: &[TensorRequest<'_>]) -> Vec<Vec<f32>> {
        let out: Vec<std::sync::Mutex<Vec<f32>>> = reqs.iter().map(|r| std::sync::Mutex::new(vec![f32::NAN; r.shape.iter().product()])).collect();
        source.fill(reqs, &|k, offset, values| out[k].lock().unwrap()[offset..offset + values.len()].copy_from_slice(values)).unwrap();
        out.into_iter().map(|m| m.into_inner().unwrap()).collect()
    }

    #[test]
    fn fill_hands_over_the_values_tensors_makes() {
        // Rows of 1000 values across chunk boundaries, a tensor of ones, one of zeros; the
        // default `fill` (from `tensors`) gives the same.
        let (big, small) = ([1100, 1000], [3, 5]);
        let reqs = [
            TensorRequest { name: "a", shape: &big, slice: None, init: InitKind::Normal },
            TensorRequest { name: "b", shape: &small, slice: None, init: InitKind::Ones },
            TensorRequest { name: "c", shape: &small, slice: None, init: InitKind::Zeros },
            TensorRequest { name: "d", shape: &small, slice: None, init: InitKind::Normal },
        ];
        let want: Vec<Vec<f32>> = RandomInit { seed: 4, std: 0.1 }.tensors(&reqs).unwrap().into_iter().map(|t| t.data).collect();
        assert_eq!(filled(&mut RandomInit { seed: 4, std: 0.1 }, &reqs), want);
        struct OneByOne(RandomInit);
        impl WeightSource for OneByOne {
            fn tensor(&mut self, req: TensorRequest<'_>) -> Result<HostTensor> {
                self.0.tensor(req)
            }
        }
        assert_eq!(filled(&mut OneByOne(RandomInit { seed: 4, std: 0.1 }), &reqs), want);
    }
}
