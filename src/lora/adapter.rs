//! A LoRA adapter on one linear layer: `y = x W + s * (dropout(x) A) B`, as peft computes it.
//!
//! A and B are trainable and kept in f32 whatever the base weights' dtype; the rank-r product of
//! the adapter's input with A is taken in f32 and added, times B, into the base layer's output
//! (see `kernels_cubecl::lora_linear` for the precision). Initialised as peft does: A Kaiming-uniform with a = sqrt(5)
//! (bound 1 / sqrt(in)), B zero, so a freshly adapted model computes exactly the base model.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use crate::backend::TrainBackend;
use kernels_cubecl::{DropoutMask, LoraFactors};
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::weights::fnv1a;

/// How adapters are made: rank, scale and dropout from the recipe, and the seed of A's init.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    /// `alpha / rank`, or `alpha / sqrt(rank)` with rslora.
    pub scale: f64,
    pub dropout: f64,
    pub seed: u64,
}

#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `[in_local, rank]`: peft's `lora_A.weight` (`[rank, in]`) transposed.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `[rank, out_local]`: peft's `lora_B.weight` (`[out, rank]`) transposed.
    pub lora_b: Param<Tensor<B, 2>>,
    pub scale: f64,
    pub dropout: f64,
}

impl<B: TrainBackend> LoraAdapter<B> {
    /// A new adapter for a layer with `inp` inputs and `out` outputs (local sizes). `path` (the
    /// module path) keys A's random stream, so the same seed gives the same adapters whatever
    /// the order layers are visited in.
    pub fn init(cfg: &LoraConfig, path: &str, inp: usize, out: usize, device: &B::Device) -> Self {
        let a = Self::init_a(cfg, path, inp);
        // Created as f32 directly: through the device's default dtype (bf16 on GPU) A would be
        // rounded.
        let f32_tensor =
            |data: Vec<f32>, shape: [usize; 2]| Tensor::<B, 2>::from_data(TensorData::new(data, shape), (device, DType::F32));
        LoraAdapter {
            lora_a: Param::from_tensor(f32_tensor(a, [inp, cfg.rank])),
            lora_b: Param::from_tensor(f32_tensor(vec![0.0; cfg.rank * out], [cfg.rank, out])),
            scale: cfg.scale,
            dropout: cfg.dropout,
        }
    }

    /// A fresh A (`[inp, rank]` row-major) for the layer at module path `path`: Kaiming-uniform
    /// drawn in peft's `[rank, in]` order from the path's own stream, stored transposed.
    pub(super) fn init_a(cfg: &LoraConfig, path: &str, inp: usize) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ fnv1a(path));
        let bound = 1.0 / (inp as f32).sqrt();
        let a_rows: Vec<f32> = (0..cfg.rank * inp).map(|_| rng.random_range(-bound..bound)).collect();
        let mut a = vec![0.0f32; inp * cfg.rank];
        for r in 0..cfg.rank {
            for i in 0..inp {
                a[i * cfg.rank + r] = a_rows[r * inp + i];
            }
        }
        a
    }

    /// The adapted layer `x w + s * (dropout(x) A) B` in `x`'s dtype, as one backend operation
    /// ([`LinearBackend::lora_linear`]: four GEMMs, no f32 tensor of the output's width).
    /// Dropout applies only while gradients are tracked (training), as Burn's own `Dropout`
    /// does, or inside [`training_forward`].
    ///
    /// # Shapes
    /// - `x`: `[..., in_local]`, `w`: `[in_local, out_local]` → `[..., out_local]`
    pub fn linear<const D: usize>(&self, x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
        let out = w.dims()[1];
        kernels_cubecl::linear::over_rows(x, out, |x| {
            let dropout = self.dropout_mask(x.shape(), &x.device(), x.dtype()).map(|(kept, keep)| DropoutMask { kept, keep });
            let lora = LoraFactors { a: self.lora_a.val(), b: self.lora_b.val(), scale: self.scale, dropout };
            B::lora_linear(x, w, lora)
        })
    }

    /// Whether the adapters of linear layers that read one input can act as one adapter of the
    /// concatenated layer ([`joined`](Self::joined)): one scale, and no dropout drawn now (peft
    /// draws one mask per layer; one adapter would share it).
    pub fn can_join(adapters: &[Option<&LoraAdapter<B>>], device: &B::Device) -> bool {
        let mut present = adapters.iter().flatten();
        let Some(first) = present.next() else { return true };
        !first.dropout_active(device) && present.all(|a| a.scale == first.scale && !a.dropout_active(device))
    }

    /// The adapters of linear layers that read one input and whose outputs are concatenated (an
    /// attention's q, k and v) as one adapter of the concatenated layer: A side by side
    /// `[in, sum of ranks]`, B block-diagonal `[sum of ranks, sum of outs]` (zeros off the blocks),
    /// so `s * (x A) B` is each layer's term in its own columns and autodiff hands each factor its
    /// own gradient. `parts` are the layers' adapters (`None`: no adapter) and output widths,
    /// adapters that [`can_join`](Self::can_join); `None` when no layer has an adapter.
    pub fn joined(parts: &[(Option<&LoraAdapter<B>>, usize)], device: &B::Device) -> Option<LoraFactors<B>> {
        let present: Vec<&LoraAdapter<B>> = parts.iter().filter_map(|(a, _)| *a).collect();
        let first = present.first()?;
        let total: usize = parts.iter().map(|(_, out)| out).sum();
        let ranks: usize = present.iter().map(|a| a.lora_b.val().dims()[0]).sum();
        // One zero fill and one copy per block (a launch each), not a zero tensor per gap
        // and two rounds of concatenation.
        let mut b = Tensor::<B, 2>::zeros([ranks, total], (device, DType::F32));
        let (mut row, mut col) = (0, 0);
        for (adapter, out) in parts {
            if let Some(adapter) = adapter {
                let block = adapter.lora_b.val();
                let rank = block.dims()[0];
                b = b.slice_assign([row..row + rank, col..col + out], block);
                row += rank;
            }
            col += out;
        }
        let a = Tensor::cat(present.iter().map(|a| a.lora_a.val()).collect(), 1);
        Some(LoraFactors { a, b, scale: first.scale, dropout: None })
    }

    /// Whether [`linear`](Self::linear) draws a dropout mask now.
    fn dropout_active(&self, device: &B::Device) -> bool {
        dropout_active::<B>(self.dropout, device)
    }

    /// The dropout mask of an adapter input of `shape` while training ([`dropout_mask`]).
    fn dropout_mask<const D: usize>(&self, shape: impl Into<burn::tensor::Shape>, device: &B::Device, dtype: DType) -> Option<(Tensor<B, D>, f64)> {
        dropout_mask(self.dropout, shape, device, dtype)
    }

    /// `s * A B`: what merging adds to the base weight in its `[in, out]` layout.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.scale
    }
}

/// Whether an adapter with `dropout` draws a mask now: only while gradients are tracked
/// (training), as Burn's own `Dropout` does, or inside [`training_forward`].
pub(super) fn dropout_active<B: TrainBackend>(dropout: f64, device: &B::Device) -> bool {
    dropout > 0.0 && (B::ad_enabled(device) || TRAINING_FORWARD.with(|t| t.get()))
}

/// The dropout mask of an adapter input of `shape` while training ([`dropout_active`]) with
/// the probability of keeping an input: values 1 (kept) or 0 in `dtype` (exact in any), the
/// `1 / keep` left to the caller's scale; `None` otherwise.
pub(super) fn dropout_mask<B: TrainBackend, const D: usize>(dropout: f64, shape: impl Into<burn::tensor::Shape>, device: &B::Device, dtype: DType) -> Option<(Tensor<B, D>, f64)> {
    if !dropout_active::<B>(dropout, device) {
        return None;
    }
    let keep = 1.0 - dropout;
    Some((Tensor::<B, D>::random(shape, Distribution::Bernoulli(keep), (device, dtype)), keep))
}

thread_local! {
    static TRAINING_FORWARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` as a training forward pass on a backend without autodiff: the forward of recomputed
/// layers runs on the inner backend (an untracked pass on `Autodiff` still registers every op in
/// its graph and keeps the tensors alive until backward), yet must draw the same dropout masks
/// as its replay under autodiff.
pub fn training_forward<T>(f: impl FnOnce() -> T) -> T {
    let before = TRAINING_FORWARD.with(|t| t.replace(true));
    let out = f();
    TRAINING_FORWARD.with(|t| t.set(before));
    out
}
