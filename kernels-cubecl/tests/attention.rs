//! Memory-efficient attention against its plain-Burn reference: output and the gradients of
//! `q`, `k`, `v` under a random upstream gradient, on NdArray (every combination) and on
//! CubeCL's wgpu runtime (lavapipe on machines without a GPU; a few combinations, it is slow).

use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor, TensorData};
use kernels_cubecl::{memory_efficient_attention, reference, AttentionKernel, AttentionOptions, FusedAttentionBackend};

type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;
type Reference = Autodiff<NdArray<f32>>;

/// xorshift64*: a few lines of deterministic randomness, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Which keys a query may not read.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mask {
    /// [`reference::attention_mask`] without segments.
    Causal,
    /// [`reference::attention_mask`] of packed segments with trailing padding (segment 0).
    Packed,
    /// Not causal: each token reads its whole segment, before and after it.
    Bidirectional,
    /// Causal with holes: a row's readable keys are not one interval (the flash kernels read
    /// such rows from the mask).
    Scattered,
}

/// Inputs of one case, generated on the host so that every backend sees the same numbers.
struct Case {
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Upstream gradient of the output.
    grad: Vec<f32>,
    /// `[batch, seq]`: two or three segments numbered from 1, the last row's tail padding.
    segments: Vec<i64>,
    mask: Mask,
}

impl Case {
    fn random(seed: u64, (batch, q_heads, kv_heads, seq, head_dim): (usize, usize, usize, usize, usize), mask: Mask) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut floats = |n: usize, spread: f32| (0..n).map(|_| rng.unit() * spread).collect::<Vec<_>>();
        // Queries and keys spread so that q k^T * scale spans a few units: a peaked softmax.
        let q = floats(batch * q_heads * seq * head_dim, 2.0);
        let k = floats(batch * kv_heads * seq * head_dim, 2.0);
        let v = floats(batch * kv_heads * seq * head_dim, 1.0);
        let grad = floats(batch * q_heads * seq * head_dim, 1.0);
        let mut segments = Vec::with_capacity(batch * seq);
        for row in 0..batch {
            let first = seq / 3 + (rng.next() % (seq as u64 / 4 + 1)) as usize;
            let second = first + seq / 4 + (rng.next() % (seq as u64 / 4 + 1)) as usize;
            let padding = if row == batch - 1 { seq - seq / 6 } else { seq };
            segments.extend((0..seq).map(|i| match i {
                _ if i >= padding => 0,
                _ if i < first => 1,
                _ if i < second => 2,
                _ => 3,
            }));
        }
        Self { batch, q_heads, kv_heads, seq, head_dim, q, k, v, grad, segments, mask }
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    fn tensor<B: Backend>(&self, values: &[f32], heads: usize, device: &B::Device) -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(values.to_vec(), [self.batch, heads, self.seq, self.head_dim]), device)
    }

    fn inputs<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        (
            self.tensor(&self.q, self.q_heads, device),
            self.tensor(&self.k, self.kv_heads, device),
            self.tensor(&self.v, self.kv_heads, device),
        )
    }

    fn blocked<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4, Bool> {
        let (b, s) = (self.batch, self.seq);
        match self.mask {
            Mask::Causal => reference::attention_mask::<B>(None, b, s, device),
            Mask::Packed => {
                let segments = Tensor::<B, 2, Int>::from_data(TensorData::new(self.segments.clone(), [b, s]), device);
                reference::attention_mask(Some(segments), b, s, device)
            }
            Mask::Scattered => {
                let m: Vec<bool> = (0..b * s * s).map(|i| (i / s % s, i % s)).map(|(q, k)| k > q || (k != q && (q * 7 + k * 3) % 5 == 0)).collect();
                Tensor::from_data(TensorData::new(m, [b, 1, s, s]), device)
            }
            Mask::Bidirectional => {
                let mut m = Vec::with_capacity(b * s * s);
                for row in 0..b {
                    let seg = &self.segments[row * s..(row + 1) * s];
                    m.extend((0..s * s).map(|i| seg[i / s] != seg[i % s]));
                }
                Tensor::from_data(TensorData::new(m, [b, 1, s, s]), device)
            }
        }
    }
}

/// Output and, when tracked, the gradients of `sum(out * grad)`.
struct Outcome {
    out: Vec<f32>,
    grad_q: Option<Vec<f32>>,
    grad_k: Option<Vec<f32>>,
    grad_v: Option<Vec<f32>>,
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

type Attention<B> = fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, f64, Tensor<B, 4, Bool>, AttentionOptions) -> Tensor<B, 4>;

fn run<B: AutodiffBackend>(case: &Case, device: &B::Device, track: [bool; 3], options: AttentionOptions, attention: Attention<B>) -> Outcome {
    run_in(None, case, device, track, options, attention)
}

/// [`run`] with the inputs and the upstream gradient cast to `dtype` first (f32 data makes f32
/// tensors on any backend).
fn run_in<B: AutodiffBackend>(
    dtype: Option<FloatDType>,
    case: &Case,
    device: &B::Device,
    track: [bool; 3],
    options: AttentionOptions,
    attention: Attention<B>,
) -> Outcome {
    let cast = |t: Tensor<B, 4>| match dtype {
        Some(dtype) => t.cast(dtype),
        None => t,
    };
    let (q, k, v) = case.inputs::<B>(device);
    let (q, k, v) = (cast(q), cast(k), cast(v));
    let tracked = |t: Tensor<B, 4>, on: bool| if on { t.require_grad() } else { t };
    let (q, k, v) = (tracked(q, track[0]), tracked(k, track[1]), tracked(v, track[2]));
    let out = attention(q.clone(), k.clone(), v.clone(), case.scale(), case.blocked::<B>(device), options);
    let upstream = cast(case.tensor::<B>(&case.grad, case.q_heads, device));
    let grads = (out.clone() * upstream).sum().backward();
    Outcome {
        out: values(out),
        grad_q: q.grad(&grads).map(values),
        grad_k: k.grad(&grads).map(values),
        grad_v: v.grad(&grads).map(values),
    }
}

fn reference_outcome(case: &Case, track: [bool; 3]) -> Outcome {
    run::<Reference>(case, &Default::default(), track, AttentionOptions::default(), |q, k, v, scale, blocked, _| {
        reference::attention(q, k, v, scale, blocked)
    })
}

fn efficient_outcome<B: AutodiffBackend + FusedAttentionBackend>(
    case: &Case,
    device: &B::Device,
    track: [bool; 3],
    options: AttentionOptions,
) -> Outcome {
    run::<B>(case, device, track, options, memory_efficient_attention::<B>)
}

/// Largest `|got - want|` relative to the largest `|want|`.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale
}

fn assert_close(label: &str, name: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert!(got.iter().all(|g| g.is_finite()), "{label}: {name} has non-finite values");
    let error = relative_error(got, want);
    assert!(error < tolerance, "{label}: {name} relative error {error}");
}

fn assert_matches(label: &str, got: &Outcome, want: &Outcome, tolerance: f32) {
    assert_close(label, "output", &got.out, &want.out, tolerance);
    for (name, got, want) in [("dq", &got.grad_q, &want.grad_q), ("dk", &got.grad_k, &want.grad_k), ("dv", &got.grad_v, &want.grad_v)] {
        match (got, want) {
            (Some(got), Some(want)) => assert_close(label, name, got, want, tolerance),
            (None, None) => {}
            _ => panic!("{label}: {name} present in one result only (efficient {}, reference {})", got.is_some(), want.is_some()),
        }
    }
}

const ALL: [bool; 3] = [true, true, true];
/// (batch, q_heads, kv_heads, seq, head_dim): GQA with two query heads per kv head, and MHA;
/// odd sequence lengths that the blocks below do not divide.
const GQA: (usize, usize, usize, usize, usize) = (2, 4, 2, 37, 8);
const MHA: (usize, usize, usize, usize, usize) = (1, 3, 3, 23, 4);
const SEEDS: [u64; 3] = [1, 2, 3];
/// `None` is the default (one block at these sizes), `Some(1)` a block per query row.
const BLOCKS: [Option<usize>; 4] = [None, Some(1), Some(8), Some(16)];
const TOLERANCE: f32 = 1e-5;

/// `causal: true` only where the mask includes the causal one; `false` with every mask.
fn option_sets(mask: Mask) -> Vec<AttentionOptions> {
    let causal: &[bool] = if mask == Mask::Bidirectional { &[false] } else { &[true, false] };
    causal.iter().flat_map(|&causal| BLOCKS.map(|block_q| AttentionOptions { block_q, causal, kernel: AttentionKernel::Blockwise })).collect()
}

#[test]
fn ndarray_matches_reference() {
    for shape in [GQA, MHA] {
        for mask in [Mask::Causal, Mask::Packed, Mask::Bidirectional] {
            for seed in SEEDS {
                let case = Case::random(seed, shape, mask);
                let want = reference_outcome(&case, ALL);
                for options in option_sets(mask) {
                    let got = efficient_outcome::<Reference>(&case, &Default::default(), ALL, options);
                    assert_matches(&format!("ndarray {shape:?} {mask:?} seed={seed} {options:?}"), &got, &want, TOLERANCE);
                }
            }
        }
    }
}

#[test]
fn untracked_inputs_get_no_gradient() {
    // A frozen k (and, separately, only v tracked): only the tracked parents get gradients.
    for track in [[true, false, true], [false, false, true], [true, true, false]] {
        let case = Case::random(4, GQA, Mask::Packed);
        let want = reference_outcome(&case, track);
        let options = AttentionOptions { block_q: Some(8), causal: true, kernel: AttentionKernel::Blockwise };
        let got = efficient_outcome::<Reference>(&case, &Default::default(), track, options);
        assert_matches(&format!("track {track:?}"), &got, &want, TOLERANCE);
    }
}

#[test]
fn ndarray_forward_only_matches_reference() {
    let case = Case::random(5, GQA, Mask::Packed);
    let (q, k, v) = case.inputs::<NdArray<f32>>(&Default::default());
    let blocked = case.blocked::<NdArray<f32>>(&Default::default());
    let want = values(reference::attention(q.clone(), k.clone(), v.clone(), case.scale(), blocked.clone()));
    let options = AttentionOptions { block_q: Some(8), causal: true, kernel: AttentionKernel::Blockwise };
    let got = values(memory_efficient_attention(q, k, v, case.scale(), blocked, options));
    assert_close("ndarray forward", "output", &got, &want, TOLERANCE);
}

fn wgpu_device() -> WgpuDevice {
    WgpuDevice::DefaultDevice
}

#[test]
fn wgpu_matches_reference() {
    let device = wgpu_device();
    for (shape, mask, seed) in [(GQA, Mask::Packed, 1), (MHA, Mask::Causal, 2), (GQA, Mask::Bidirectional, 3)] {
        let case = Case::random(seed, shape, mask);
        let want = reference_outcome(&case, ALL);
        let causal = mask != Mask::Bidirectional;
        for options in [AttentionOptions { block_q: Some(8), causal, kernel: AttentionKernel::Blockwise }, AttentionOptions { block_q: None, causal: false, kernel: AttentionKernel::Blockwise }] {
            let got = efficient_outcome::<Autodiff<Wgpu>>(&case, &device, ALL, options);
            assert_matches(&format!("wgpu {shape:?} {mask:?} seed={seed} {options:?}"), &got, &want, TOLERANCE);
        }
    }
}

#[test]
fn wgpu_forward_only_matches_reference() {
    let device = wgpu_device();
    let case = Case::random(6, GQA, Mask::Packed);
    let want = reference_outcome(&case, [false; 3]);
    let (q, k, v) = case.inputs::<Wgpu>(&device);
    let options = AttentionOptions { block_q: Some(16), causal: true, kernel: AttentionKernel::Blockwise };
    let got = values(memory_efficient_attention(q, k, v, case.scale(), case.blocked::<Wgpu>(&device), options));
    assert_close("wgpu forward", "output", &got, &want.out, TOLERANCE);
}

/// GQA with three query heads per kv head over three 16-row tiles of the flash kernels, the
/// last one partial.
const LONG_GQA: (usize, usize, usize, usize, usize) = (2, 6, 2, 45, 16);

#[test]
fn wgpu_flash_matches_reference() {
    // The flash kernels, one unit per product element on wgpu (16 x 16 tiles): odd lengths,
    // GQA and MHA, every mask, the causal promise and without it.
    let device = wgpu_device();
    let cases = [
        (GQA, Mask::Packed, 1),
        (MHA, Mask::Causal, 2),
        (GQA, Mask::Bidirectional, 3),
        (LONG_GQA, Mask::Causal, 4),
        (LONG_GQA, Mask::Packed, 5),
        (LONG_GQA, Mask::Scattered, 7),
    ];
    for (shape, mask, seed) in cases {
        let case = Case::random(seed, shape, mask);
        let want = reference_outcome(&case, ALL);
        let causal: &[bool] = if mask == Mask::Bidirectional { &[false] } else { &[true, false] };
        for &causal in causal {
            // The flash forward with the flash backward, and with the blockwise backward (which
            // reads the flash forward's log-sum-exp).
            for kernel in [AttentionKernel::Flash, AttentionKernel::FlashForward] {
                let options = AttentionOptions { block_q: None, causal, kernel };
                let (q, k, v) = case.inputs::<Wgpu>(&device);
                assert_eq!(Wgpu::attention_kernel(&q, &k, &v, options), kernel, "the flash kernels did not run");
                let got = efficient_outcome::<Autodiff<Wgpu>>(&case, &device, ALL, options);
                assert_matches(&format!("wgpu {kernel:?} {shape:?} {mask:?} seed={seed} causal={causal}"), &got, &want, TOLERANCE);
            }
        }
    }
    // Auto takes the flash kernels only where they keep their accumulators in registers (CUDA's
    // manual mma): on wgpu it stays blockwise (unless the environment picks a kernel).
    if std::env::var_os("KERNELS_CUBECL_ATTENTION").is_none() {
        let (q, k, v) = Case::random(1, GQA, Mask::Causal).inputs::<Wgpu>(&device);
        let auto = AttentionOptions { block_q: None, causal: true, kernel: AttentionKernel::Auto };
        assert_eq!(Wgpu::attention_kernel(&q, &k, &v, auto), AttentionKernel::Blockwise);
    }
    // Only some inputs tracked: the kernels run for the wanted gradients alone.
    for track in [[false, false, true], [true, false, false], [false, true, false]] {
        let case = Case::random(6, LONG_GQA, Mask::Packed);
        let want = reference_outcome(&case, track);
        let options = AttentionOptions { block_q: None, causal: true, kernel: AttentionKernel::Flash };
        let got = efficient_outcome::<Autodiff<Wgpu>>(&case, &device, track, options);
        assert_matches(&format!("wgpu flash track {track:?}"), &got, &want, TOLERANCE);
    }
}

#[test]
fn other_dtypes_come_back_in_their_dtype() {
    // f64 inputs (the dtype other than f32 that NdArray has) take every cast: scores and
    // softmax in f32, matmuls in f64, dK/dV accumulated in f32. Checked against the reference
    // run in f64 too.
    let case = Case::random(9, GQA, Mask::Packed);
    let run_f64 = |attention: Attention<Reference>| {
        let device = Default::default();
        let (q, k, v) = case.inputs::<Reference>(&device);
        let [q, k, v] = [q, k, v].map(|t| t.cast(FloatDType::F64).require_grad());
        let out = attention(q.clone(), k.clone(), v.clone(), case.scale(), case.blocked::<Reference>(&device), AttentionOptions {
            block_q: Some(8),
            causal: true,
            kernel: AttentionKernel::Blockwise,
        });
        assert_eq!(out.dtype(), DType::F64);
        let upstream = case.tensor::<Reference>(&case.grad, case.q_heads, &device).cast(FloatDType::F64);
        let grads = (out.clone() * upstream).sum().backward();
        let grad = |t: &Tensor<Reference, 4>| {
            let g = t.grad(&grads).expect("tracked input has a gradient");
            assert_eq!(g.dtype(), DType::F64);
            values(g)
        };
        Outcome { grad_q: Some(grad(&q)), grad_k: Some(grad(&k)), grad_v: Some(grad(&v)), out: values(out) }
    };
    let want = run_f64(|q, k, v, scale, blocked, _| reference::attention(q, k, v, scale, blocked));
    let got = run_f64(memory_efficient_attention::<Reference>);
    assert_matches("f64", &got, &want, TOLERANCE);
}

#[test]
fn causal_option_skips_the_keys_after_a_block() {
    // The promise is taken at its word: with a mask that lets queries read later keys, `causal:
    // true` gives another (wrong) result, so the skip is real.
    let case = Case::random(8, GQA, Mask::Bidirectional);
    let (q, k, v) = case.inputs::<NdArray<f32>>(&Default::default());
    let blocked = case.blocked::<NdArray<f32>>(&Default::default());
    let want = values(reference::attention(q.clone(), k.clone(), v.clone(), case.scale(), blocked.clone()));
    let options = AttentionOptions { block_q: Some(8), causal: true, kernel: AttentionKernel::Blockwise };
    let got = values(memory_efficient_attention(q, k, v, case.scale(), blocked, options));
    assert!(relative_error(&got, &want) > 0.01);
}

#[test]
fn log_sum_exp_is_saved_per_row() {
    // L is what backward rebuilds the probabilities from: check it against the scores directly.
    let case = Case::random(7, MHA, Mask::Causal);
    let (q, k, v) = case.inputs::<NdArray<f32>>(&Default::default());
    let blocked = case.blocked::<NdArray<f32>>(&Default::default());
    let scores = q.clone().matmul(k.clone().swap_dims(2, 3)) * case.scale();
    let [b, h, s, _] = q.dims();
    let masked = scores.mask_fill(blocked.clone().expand([b, h, s, s]), f32::NEG_INFINITY);
    let want = values(masked.exp().sum_dim(3).log());
    let options = AttentionOptions { block_q: Some(5), causal: true, kernel: AttentionKernel::Blockwise };
    let f = NdArray::<f32>::blockwise_attention_forward(q, k, v, case.scale(), blocked, options);
    assert_eq!(f.lse.dims(), [b, h, s]);
    assert_close("lse", "lse", &values(f.lse), &want, TOLERANCE);
}

#[test]
fn default_block_keeps_scores_near_256_mib() {
    let options = AttentionOptions::CAUSAL;
    // Qwen2.5-7B: 28 query heads; batch 4 of seq 2048 -> 256 rows of 0.9 MB of f32 scores.
    assert_eq!(options.block_q_for(4, 28, 2048), 256);
    assert_eq!(options.block_q_for(16, 28, 2048), 64);
    assert_eq!(options.block_q_for(2, 4, 37), 37, "never more than seq");
    let fixed = AttentionOptions { block_q: Some(8), causal: true, kernel: AttentionKernel::Blockwise };
    assert_eq!(fixed.block_q_for(4, 28, 2048), 8);
    assert_eq!(fixed.block_q_for(1, 1, 5), 5);
}

#[test]
#[should_panic(expected = "not a multiple")]
fn heads_not_a_multiple_of_kv_heads_are_refused() {
    let case = Case::random(1, (1, 3, 2, 5, 4), Mask::Causal);
    let (q, k, v) = case.inputs::<NdArray<f32>>(&Default::default());
    let blocked = case.blocked::<NdArray<f32>>(&Default::default());
    memory_efficient_attention(q, k, v, case.scale(), blocked, AttentionOptions::default());
}

/// Inputs of one query block's softmax, forward and backward, generated on the host.
struct BlockCase {
    dims: [usize; 4],
    /// Raw scores `q k^T`, `[batch, heads, rows, keys]`.
    scores: Vec<f32>,
    /// `[batch, 1, rows, keys]`: about a third of the keys blocked, and every key of a few rows.
    blocked: Vec<bool>,
    /// `dP` like the scores, `delta` one per row.
    d_probs: Vec<f32>,
    delta: Vec<f32>,
}

impl BlockCase {
    fn random(seed: u64, dims: [usize; 4]) -> Self {
        let [b, h, rows, keys] = dims;
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut floats = |n: usize, spread: f32| (0..n).map(|_| rng.unit() * spread).collect::<Vec<_>>();
        let scores = floats(b * h * rows * keys, 8.0);
        let d_probs = floats(b * h * rows * keys, 1.0);
        let delta = floats(b * h * rows, 1.0);
        let coins = floats(b * rows * keys, 1.0);
        let empty_row = |row: usize| row % 7 == 3;
        let blocked = coins.iter().enumerate().map(|(i, &c)| c < -0.33 || empty_row(i / keys % rows)).collect();
        Self { dims, scores, blocked, d_probs, delta }
    }

    fn scale(&self) -> f64 {
        0.35
    }

    fn scores<B: Backend>(&self, values: &[f32], device: &B::Device) -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(values.to_vec(), self.dims), device)
    }

    /// The mask block as attention takes it: a view of a larger mask (2 rows before the block,
    /// 3 keys after it).
    fn mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4, Bool> {
        let [b, _, rows, keys] = self.dims;
        let block = Tensor::<B, 4, Bool>::from_data(TensorData::new(self.blocked.clone(), [b, 1, rows, keys]), device);
        let rows_before = Tensor::<B, 4, Bool>::full([b, 1, 2, keys], true, device);
        let keys_after = Tensor::<B, 4, Bool>::full([b, 1, rows + 2, 3], false, device);
        let full = Tensor::cat(vec![Tensor::cat(vec![rows_before, block], 2), keys_after], 3);
        full.narrow(2, 2, rows).narrow(3, 0, keys)
    }

    /// A per-row `[batch, heads, rows]` tensor as a view: rows from 1 of a longer tensor.
    fn per_row<B: Backend>(&self, values: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, h, rows] = values.dims();
        let before = Tensor::<B, 3>::zeros([b, h, 1], &values.device()).cast(values.dtype());
        Tensor::cat(vec![before, values], 2).narrow(2, 1, rows)
    }
}

/// Largest `|got - want|` relative to the largest finite `|want|`, after checking that both are
/// non-finite (NaN or infinite) at the same places.
fn assert_same_values(label: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{label}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.is_finite(), w.is_finite(), "{label}: element {i} is {g}, the default's {w}");
    }
    let finite = |v: &[f32]| v.iter().map(|x| if x.is_finite() { *x } else { 0.0 }).collect::<Vec<_>>();
    let error = relative_error(&finite(got), &finite(want));
    assert!(error < tolerance, "{label}: relative error {error}");
}

/// (batch, heads, rows, keys): odd sizes; keys beyond one cube's units (each unit reads
/// several); more rows than one grid axis holds.
const BLOCK_SHAPES: [[usize; 4]; 3] = [[2, 3, 37, 53], [1, 2, 5, 300], [1, 2, 35_000, 3]];

/// The row-kernel softmax of `B` against the trait's plain-Burn default on the same backend.
fn block_softmax_matches_default<B: Backend + FusedAttentionBackend>(device: &B::Device, tolerance: f32) {
    for dims in BLOCK_SHAPES {
        for seed in SEEDS {
            let case = BlockCase::random(seed, dims);
            let scores = case.scores::<B>(&case.scores, device);
            let mask = case.mask::<B>(device);
            let (want_p, want_l) = kernels_cubecl::attention::block_softmax(scores.clone(), case.scale(), mask.clone());
            let (got_p, got_l) = B::attention_block_softmax(scores, case.scale(), mask);
            assert_eq!((got_p.dims(), got_l.dims()), (want_p.dims(), want_l.dims()));
            let label = format!("softmax {dims:?} seed={seed}");
            let (got_p, want_p, got_l, want_l) = (values(got_p), values(want_p), values(got_l), values(want_l));
            assert_same_values(&format!("{label} probs"), &got_p, &want_p, tolerance);
            assert_same_values(&format!("{label} lse"), &got_l, &want_l, tolerance);
            // A row that may read no key: probabilities 0 and L = +inf (flash-attention's rule).
            let keys = dims[3];
            let mut empty = (0..dims[0] * dims[1] * dims[2]).filter(|r| r % dims[2] % 7 == 3);
            assert!(empty.all(|r| got_l[r] == f32::INFINITY && got_p[r * keys..(r + 1) * keys].iter().all(|&p| p == 0.0)), "{label}: an empty row");
        }
    }
}

/// The row-kernel softmax backward of `B` against the trait's plain-Burn default.
fn block_grad_matches_default<B: Backend + FusedAttentionBackend>(device: &B::Device, tolerance: f32) {
    for dims in BLOCK_SHAPES {
        for seed in SEEDS {
            let case = BlockCase::random(seed, dims);
            let scores = case.scores::<B>(&case.scores, device);
            let mask = case.mask::<B>(device);
            // L as the forward saves it (+inf for rows that may read no key), seen through a view.
            let lse = case.per_row(kernels_cubecl::attention::block_softmax(scores.clone(), case.scale(), mask.clone()).1);
            let [b, h, rows, _] = dims;
            let delta = Tensor::<B, 3>::from_data(TensorData::new(case.delta.clone(), [b, h, rows]), device);
            let upstream = (case.scores::<B>(&case.d_probs, device), case.per_row(delta));
            for (with_upstream, want_probs) in [(true, true), (true, false), (false, true)] {
                let up = with_upstream.then(|| upstream.clone());
                let args = (scores.clone(), case.scale(), mask.clone(), lse.clone());
                let (want_p, want_ds) = kernels_cubecl::attention::block_softmax_grad(args.0.clone(), args.1, args.2.clone(), args.3.clone(), up.clone(), want_probs);
                let (got_p, got_ds) = B::attention_block_grad(args.0, args.1, args.2, args.3, up, want_probs);
                let label = format!("grad {dims:?} seed={seed} upstream={with_upstream} probs={want_probs}");
                assert_eq!(got_p.is_some(), want_probs, "{label}");
                assert_eq!(got_ds.is_some(), with_upstream, "{label}");
                for (name, got, want) in [("probs", got_p, want_p), ("dS", got_ds, want_ds)] {
                    if let (Some(got), Some(want)) = (got, want) {
                        assert_eq!(got.dims(), want.dims(), "{label} {name}");
                        assert_same_values(&format!("{label} {name}"), &values(got), &values(want), tolerance);
                    }
                }
            }
        }
    }
}

#[test]
fn wgpu_block_softmax_matches_default() {
    block_softmax_matches_default::<Wgpu>(&wgpu_device(), TOLERANCE);
}

#[test]
fn wgpu_block_grad_matches_default() {
    block_grad_matches_default::<Wgpu>(&wgpu_device(), TOLERANCE);
}

/// The same comparisons on CUDA (bool masks stored as u8 there, u32 on wgpu), in f32 and bf16,
/// the row kernels on (as by default; `KERNELS_CUBECL_CUDA_KERNELS=0` would compare the default
/// with itself, so it fails these): `cargo test -p kernels-cubecl --features cuda -- --ignored
/// --exact cuda::NAME`, one test a process: Burn fixes a CUDA device's float dtype at its first
/// tensor, so an f32 test after a bf16 one computes in bf16 and fails (session 26).
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use burn::backend::cuda::CudaDevice;

    type CudaF32 = burn::backend::Cuda<f32, i32>;
    type CudaBf16 = burn::backend::Cuda<burn::tensor::bf16, i32>;

    fn forced() {
        assert_ne!(std::env::var("KERNELS_CUBECL_CUDA_KERNELS").as_deref(), Ok("0"), "KERNELS_CUBECL_CUDA_KERNELS=0 turns the kernels under test off");
    }

    /// The flash kernels on CUDA in bf16 on tensor cores against the f32 reference: head dims 128
    /// and 64 over several 64-row tiles, the last partial, GQA and MHA, packed, causal and
    /// bidirectional masks, and one whose rows are not intervals: the forward and the three
    /// gradients with their accumulators in registers (CUDA's manual MMA). Run it alone
    /// (`--exact`): once
    /// a bf16 tensor is on the device, the f32 tests of the same process compute in bf16
    /// (seen on the H100, session 26); the per-element path runs on wgpu.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_flash_matches_reference() {
        cuda_flash_case(AttentionKernel::Flash);
    }

    /// As [`cuda_flash_matches_reference`], the flash forward with the blockwise backward
    /// (`FlashForward`, which reads the forward's log-sum-exp). Run it alone (`--exact`).
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_flash_forward_matches_reference() {
        cuda_flash_case(AttentionKernel::FlashForward);
    }

    fn cuda_flash_case(kernel: AttentionKernel) {
        forced();
        let device = CudaDevice::default();
        let cases = [
            ((2, 8, 2, 200, 128), Mask::Packed, 1),
            ((1, 4, 4, 130, 64), Mask::Causal, 2),
            ((1, 4, 2, 96, 128), Mask::Bidirectional, 3),
            ((1, 4, 2, 100, 64), Mask::Scattered, 4),
        ];
        for (shape, mask, seed) in cases {
            let case = Case::random(seed, shape, mask);
            let want = reference_outcome(&case, ALL);
            let causal = mask != Mask::Bidirectional;
            let options = AttentionOptions { block_q: None, causal, kernel };
            let (q, k, v) = case.inputs::<CudaF32>(&device);
            let [q, k, v] = [q, k, v].map(|t| t.cast(FloatDType::BF16));
            assert_eq!(CudaF32::attention_kernel(&q, &k, &v, options), kernel, "bf16 did not take the flash kernels");
            if kernel == AttentionKernel::Flash && std::env::var_os("KERNELS_CUBECL_ATTENTION").is_none() {
                // Auto takes the register kernels on CUDA.
                let auto = AttentionOptions { kernel: AttentionKernel::Auto, ..options };
                assert_eq!(CudaF32::attention_kernel(&q, &k, &v, auto), AttentionKernel::Flash, "Auto did not take the register flash kernels");
            }
            let got = run_in::<Autodiff<CudaF32>>(Some(FloatDType::BF16), &case, &device, ALL, options, memory_efficient_attention);
            // Inputs rounded to bf16, probabilities multiplied in bf16: 8 significant bits.
            assert_matches(&format!("cuda bf16 {kernel:?} {shape:?} {mask:?}"), &got, &want, 3e-2);
        }
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_f32_block_softmax_matches_default() {
        forced();
        block_softmax_matches_default::<CudaF32>(&CudaDevice::default(), TOLERANCE);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_f32_block_grad_matches_default() {
        forced();
        block_grad_matches_default::<CudaF32>(&CudaDevice::default(), TOLERANCE);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_bf16_block_softmax_matches_default() {
        forced();
        // Probabilities stored in bf16 (8 significant bits) by both.
        block_softmax_matches_default::<CudaBf16>(&CudaDevice::default(), 1e-2);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_bf16_block_grad_matches_default() {
        forced();
        block_grad_matches_default::<CudaBf16>(&CudaDevice::default(), 1e-2);
    }
}
