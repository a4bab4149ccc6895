//! Fused linear cross-entropy against its plain-Burn reference: loss, token count and the
//! gradients of `h` and `w`, on CubeCL's wgpu runtime (lavapipe on machines without a GPU),
//! on NdArray (the plain chunked path), and, ignored unless a GPU is there, on CUDA in bf16.

use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use kernels_cubecl::{
    fused_linear_cross_entropy, reference, FusedCrossEntropyBackend, LinearCrossEntropyOptions, WantedGrads,
};

type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;
type Reference = Autodiff<NdArray<f32>>;

const IGNORE: i64 = -100;

/// Inputs of one case, generated on the host so that every backend sees the same numbers.
struct Case {
    tokens: usize,
    hidden: usize,
    vocab: usize,
    h: Vec<f32>,
    w: Vec<f32>,
    labels: Vec<i64>,
}

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

impl Case {
    /// Random states and head; about one label in five ignored, and the middle one always. Logits spread over several
    /// units so that the softmax is far from uniform.
    fn random(seed: u64, tokens: usize, hidden: usize, vocab: usize) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let h = (0..tokens * hidden).map(|_| rng.unit() * 2.0).collect();
        let w = (0..hidden * vocab).map(|_| rng.unit() / (hidden as f32).sqrt() * 3.0).collect();
        let mut labels: Vec<i64> = (0..tokens)
            .map(|_| if rng.next() % 5 == 0 { IGNORE } else { (rng.next() % vocab as u64) as i64 })
            .collect();
        // At least one ignored label, however few the tokens.
        labels[tokens / 2] = IGNORE;
        Self { tokens, hidden, vocab, h, w, labels }
    }

    fn inputs<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1, Int>) {
        let h = Tensor::from_data(TensorData::new(self.h.clone(), [self.tokens, self.hidden]), device);
        let w = Tensor::from_data(TensorData::new(self.w.clone(), [self.hidden, self.vocab]), device);
        let labels = Tensor::from_data(TensorData::new(self.labels.clone(), [self.tokens]), device);
        (h, w, labels)
    }
}

/// Loss sum, token count and the gradients of `sum / tokens` (the model's normalisation, so the
/// upstream gradient is not 1) for `h` and `w`, each only when that input is tracked.
struct Outcome {
    sum: f32,
    tokens: usize,
    grad_h: Option<Vec<f32>>,
    grad_w: Option<Vec<f32>>,
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn run<B: AutodiffBackend>(
    case: &Case,
    device: &B::Device,
    track: WantedGrads,
    loss: impl FnOnce(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1, Int>) -> reference::CrossEntropy<B>,
) -> Outcome {
    let (h, w, labels) = case.inputs::<B>(device);
    let h = if track.h { h.require_grad() } else { h };
    let w = if track.w { w.require_grad() } else { w };
    let ce = loss(h.clone(), w.clone(), labels);
    let sum = values(ce.sum.clone())[0];
    let grads = (ce.sum / ce.tokens.max(1) as f64).backward();
    Outcome {
        sum,
        tokens: ce.tokens,
        grad_h: h.grad(&grads).map(values),
        grad_w: w.grad(&grads).map(values),
    }
}

fn reference_outcome(case: &Case, track: WantedGrads) -> Outcome {
    run::<Reference>(case, &Default::default(), track, |h, w, labels| {
        reference::linear_cross_entropy(h, w, labels, IGNORE)
    })
}

fn fused_outcome<B: AutodiffBackend + FusedCrossEntropyBackend>(
    case: &Case,
    device: &B::Device,
    track: WantedGrads,
    chunk_tokens: Option<usize>,
) -> Outcome {
    let options = LinearCrossEntropyOptions { ignore_index: IGNORE, chunk_tokens };
    run::<B>(case, device, track, |h, w, labels| fused_linear_cross_entropy(h, w, labels, options))
}

/// Largest `|got - want|` relative to the largest `|want|`, so that tolerances do not depend on
/// the scale of a gradient.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale
}

fn assert_matches(label: &str, got: &Outcome, want: &Outcome, tolerance: f32) {
    assert_eq!(got.tokens, want.tokens, "{label}: token count");
    let loss_error = (got.sum - want.sum).abs() / want.sum.abs().max(1.0);
    assert!(loss_error < tolerance, "{label}: loss {} vs reference {} (relative error {loss_error})", got.sum, want.sum);
    for (name, got, want) in [("dh", &got.grad_h, &want.grad_h), ("dw", &got.grad_w, &want.grad_w)] {
        match (got, want) {
            (Some(got), Some(want)) => {
                let error = relative_error(got, want);
                assert!(error < tolerance, "{label}: {name} relative error {error}");
            }
            (None, None) => {}
            _ => panic!("{label}: {name} present in one result only (fused {}, reference {})", got.is_some(), want.is_some()),
        }
    }
}

/// (tokens, hidden, vocab): tokens not a multiple of the chunks below, rows of loads not a
/// multiple of the row kernel's units (up to 1024, or the device's limit) and one row of fewer
/// loads than units; the kernel reads 1, 2 and 4 logits a load at these vocabularies (4100:
/// 1025 loads a row, so some unit takes two or more).
const SHAPES: [(usize, usize, usize); 3] = [(37, 24, 1001), (5, 8, 130), (23, 16, 4100)];
const SEEDS: [u64; 3] = [1, 2, 3];
/// `None` is the default chunk (Liger's rule), `Some(1)` a chunk per token.
const CHUNKS: [Option<usize>; 4] = [None, Some(1), Some(8), Some(64)];

fn wgpu_device() -> WgpuDevice {
    WgpuDevice::DefaultDevice
}

#[test]
fn wgpu_runtime_runs_a_kernel() {
    // Fails first, and plainly, where no Vulkan driver is installed (CI: mesa-vulkan-drivers).
    let device = wgpu_device();
    let a = Tensor::<Wgpu, 1>::from_floats([1.0, 2.0, 3.0], &device);
    assert_eq!(values(a.clone() + a), vec![2.0, 4.0, 6.0]);
}

#[test]
fn wgpu_fused_matches_reference() {
    let device = wgpu_device();
    for (tokens, hidden, vocab) in SHAPES {
        for seed in SEEDS {
            let case = Case::random(seed, tokens, hidden, vocab);
            let want = reference_outcome(&case, WantedGrads::BOTH);
            for chunk in CHUNKS {
                let got = fused_outcome::<Autodiff<Wgpu>>(&case, &device, WantedGrads::BOTH, chunk);
                assert_matches(&format!("wgpu T={tokens} H={hidden} V={vocab} seed={seed} chunk={chunk:?}"), &got, &want, 2e-5);
            }
        }
    }
}

#[test]
fn wgpu_frozen_head_gets_no_gradient() {
    // LoRA freezes the LM head: only dh is computed and registered.
    let device = wgpu_device();
    let case = Case::random(7, 37, 24, 1001);
    let track = WantedGrads { h: true, w: false };
    let got = fused_outcome::<Autodiff<Wgpu>>(&case, &device, track, Some(16));
    assert!(got.grad_w.is_none());
    assert_matches("frozen head", &got, &reference_outcome(&case, track), 2e-5);
}

#[test]
fn wgpu_forward_only_matches_reference() {
    let device = wgpu_device();
    let case = Case::random(11, 37, 24, 1001);
    let want = reference_outcome(&case, WantedGrads::NONE);
    let (h, w, labels) = case.inputs::<Wgpu>(&device);
    let options = LinearCrossEntropyOptions { ignore_index: IGNORE, chunk_tokens: Some(16) };
    let ce = fused_linear_cross_entropy(h, w, labels, options);
    let got = Outcome { sum: values(ce.sum)[0], tokens: ce.tokens, grad_h: None, grad_w: None };
    assert_matches("forward only", &got, &want, 2e-5);
}

#[test]
fn wgpu_all_labels_ignored_gives_zero_loss_and_gradients() {
    let device = wgpu_device();
    let mut case = Case::random(5, 5, 8, 130);
    case.labels.iter_mut().for_each(|l| *l = IGNORE);
    let (h, w, labels) = case.inputs::<Wgpu>(&device);
    let options = LinearCrossEntropyOptions { ignore_index: IGNORE, chunk_tokens: Some(2) };
    let parts = Wgpu::linear_cross_entropy_parts(h, w, labels, options, WantedGrads::BOTH);
    assert_eq!(parts.tokens, 0);
    assert_eq!(values(parts.sum), vec![0.0]);
    assert!(values(parts.grad_h.unwrap()).iter().all(|&g| g == 0.0));
    assert!(values(parts.grad_w.unwrap()).iter().all(|&g| g == 0.0));
}

#[test]
fn ndarray_chunked_matches_reference() {
    for (tokens, hidden, vocab) in SHAPES {
        for seed in SEEDS {
            let case = Case::random(seed, tokens, hidden, vocab);
            let want = reference_outcome(&case, WantedGrads::BOTH);
            for chunk in CHUNKS {
                let got = fused_outcome::<Reference>(&case, &Default::default(), WantedGrads::BOTH, chunk);
                assert_matches(&format!("ndarray T={tokens} H={hidden} V={vocab} seed={seed} chunk={chunk:?}"), &got, &want, 2e-5);
            }
        }
    }
}

#[test]
#[should_panic(expected = "outside [0, 130)")]
fn label_outside_vocabulary_is_refused() {
    let mut case = Case::random(3, 5, 8, 130);
    case.labels[2] = 130;
    let (h, w, labels) = case.inputs::<NdArray<f32>>(&Default::default());
    fused_linear_cross_entropy(h, w, labels, LinearCrossEntropyOptions::default());
}

#[test]
fn default_chunk_keeps_logits_near_the_size_of_h() {
    let options = LinearCrossEntropyOptions::default();
    // Qwen2.5-7B: 16k tokens, hidden 3584, vocab 152064 -> 43 logits per hidden value.
    assert_eq!(options.chunk_tokens_for(16384, 3584, 152_064), 512);
    assert_eq!(options.chunk_tokens_for(37, 24, 1001), 1);
    assert_eq!(options.chunk_tokens_for(5, 8, 4), 5, "never more than the tokens");
    let fixed = LinearCrossEntropyOptions { chunk_tokens: Some(8), ..options };
    assert_eq!(fixed.chunk_tokens_for(37, 24, 1001), 8);
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use burn::backend::cuda::CudaDevice;
    use burn::tensor::FloatDType;

    // burn's `Cuda` is the plain CubeBackend as long as burn's `fusion` feature is off.
    type Cuda = burn::backend::Cuda<burn::tensor::bf16, i32>;

    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo test -p kernels-cubecl --features cuda -- --ignored"]
    fn cuda_bf16_fused_matches_f32_reference() {
        let device = CudaDevice::default();
        for (tokens, hidden, vocab) in SHAPES {
            let case = Case::random(1, tokens, hidden, vocab);
            let want = reference_outcome(&case, WantedGrads::BOTH);
            let (h, w, labels) = case.inputs::<Autodiff<Cuda>>(&device);
            let (h, w) = (h.cast(FloatDType::BF16).require_grad(), w.cast(FloatDType::BF16).require_grad());
            let options = LinearCrossEntropyOptions { ignore_index: IGNORE, chunk_tokens: Some(8) };
            let ce = fused_linear_cross_entropy(h.clone(), w.clone(), labels, options);
            let sum = values(ce.sum.clone())[0];
            let grads = (ce.sum / ce.tokens as f64).backward();
            let got = Outcome { sum, tokens: ce.tokens, grad_h: h.grad(&grads).map(values), grad_w: w.grad(&grads).map(values) };
            // bf16 inputs and gradients: 8 significant bits.
            assert_matches(&format!("cuda bf16 T={tokens} H={hidden} V={vocab}"), &got, &want, 2e-2);
        }
    }
}
