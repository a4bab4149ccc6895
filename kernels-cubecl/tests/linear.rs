//! The GEMM operations of [`LinearBackend`] against plain Burn:
//! - the LoRA linear layer (one op with its own backward) against autodiff of peft's maths
//!   written in Burn ops (`x w + cast(s ((x_f32 * mask / keep) A) B)`), output and the gradients of x,
//!   w, A and B, with and without a dropout mask, on NdArray, on wgpu (CubeCL's matmul as the
//!   runtime's GEMM), and on CUDA f32 and bf16 (cuBLAS) in the ignored tests;
//! - `linear_matmul` and `batched_matmul` (autodiff ops over the backend's GEMM) against
//!   autodiff of Burn's matmul on NdArray;
//! - the GEMM primitive itself with transposed operands, an f32 output and an accumulator;
//! - the grouped GEMM of a mixture of experts (`grouped_matmul`, groups of different sizes, one
//!   empty) against Burn's matmul a group at a time, output and both gradients.
//!
//! Shapes are odd, several seeds each.

use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use kernels_cubecl::{gemm_grouped_outer_spread, reference_gemm_grouped_outer, reference_gemm_scaled, DropoutMask, LinearBackend, LoraFactors};

type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;
type Cpu = NdArray<f32>;
type Reference = Autodiff<Cpu>;

/// xorshift64*: a few lines of deterministic randomness, the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-spread, spread).
    fn values(&mut self, n: usize, spread: f32) -> Vec<f32> {
        (0..n).map(|_| ((self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * spread).collect()
    }
}

const SEEDS: [u64; 3] = [1, 2, 3];

/// A tensor in the backend's storage dtype (f32 values rounded to it).
fn tensor<B: Backend, const D: usize>(values: &[f32], shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// A tensor kept in f32 whatever the storage dtype (LoRA's factors).
fn f32_tensor<B: Backend, const D: usize>(values: &[f32], shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), (device, DType::F32))
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(FloatDType::F32).into_data().convert::<f32>().to_vec().unwrap()
}

/// `values` as the backend stores them (rounded to bf16 on a bf16 backend).
fn stored<B: Backend>(values: &[f32], device: &B::Device) -> Vec<f32> {
    self::values(tensor::<B, 1>(values, [values.len()], device))
}

/// Largest `|got - want|` relative to the largest `|want|`.
fn assert_close(label: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{label}: lengths");
    assert!(got.iter().all(|g| g.is_finite()), "{label}: non-finite values");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let error = got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale;
    let wrong = got.iter().zip(want).filter(|(g, w)| (*g - *w).abs() > tolerance * scale).count();
    let first: Vec<(usize, f32, f32)> =
        got.iter().zip(want).enumerate().filter(|(_, (g, w))| (*g - *w).abs() > tolerance * scale).map(|(i, (g, w))| (i, *g, *w)).take(4).collect();
    assert!(error < tolerance, "{label}: relative error {error}; {wrong} of {} wrong, first (index, got, want): {first:?}", got.len());
}

/// A LoRA layer's inputs: `x [m, k]`, `w [k, n]`, `a [k, r]`, `b [r, n]` (B non-zero, as after
/// some training), the upstream gradient `dy [m, n]`, and a dropout mask (1 kept, 0 dropped;
/// kept inputs scaled by `1 / KEEP`) or none.
struct LoraCase {
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    dy: Vec<f32>,
    mask: Option<Vec<f32>>,
    scale: f64,
}

const KEEP: f64 = 0.75;

/// (m, k, n, r): tiny, LoRA-like (a narrow rank), and wider outputs than inputs.
const LORA_SHAPES: [(usize, usize, usize, usize); 3] = [(7, 5, 3, 2), (33, 70, 41, 8), (130, 19, 260, 4)];

impl LoraCase {
    fn random(seed: u64, (m, k, n, r): (usize, usize, usize, usize), dropout: bool) -> Self {
        let mut rng = Rng::new(seed);
        let mask = dropout.then(|| rng.values(m * k, 1.0).into_iter().map(|u| if u < 0.5 { 1.0 } else { 0.0 }).collect());
        LoraCase {
            m,
            k,
            n,
            r,
            x: rng.values(m * k, 2.0),
            w: rng.values(k * n, 0.3),
            a: rng.values(k * r, 0.5),
            b: rng.values(r * n, 0.5),
            dy: rng.values(m * n, 1.0),
            mask,
            scale: 4.0,
        }
    }

    /// The same case with `x`, `w` and `dy` as `B` stores them, for a reference in f32.
    fn stored_on<B: Backend>(&self, device: &B::Device) -> Self {
        LoraCase {
            x: stored::<B>(&self.x, device),
            w: stored::<B>(&self.w, device),
            dy: stored::<B>(&self.dy, device),
            mask: self.mask.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            ..*self
        }
    }
}

/// Output, dx, dw, dA, dB of the LoRA layer under autodiff: the op (`fused`) or the plain-Burn
/// maths.
fn lora_outcome<B: AutodiffBackend + LinearBackend>(case: &LoraCase, device: &B::Device, fused: bool) -> [Vec<f32>; 5] {
    let (m, k, n, r) = (case.m, case.k, case.n, case.r);
    let x = tensor::<B, 2>(&case.x, [m, k], device).require_grad();
    let w = tensor::<B, 2>(&case.w, [k, n], device).require_grad();
    let a = f32_tensor::<B, 2>(&case.a, [k, r], device).require_grad();
    let b = f32_tensor::<B, 2>(&case.b, [r, n], device).require_grad();
    let y = if fused {
        let kept = case.mask.as_ref().map(|v| tensor::<B, 2>(v, [m, k], device));
        let dropout = kept.map(|kept| DropoutMask { kept, keep: KEEP });
        let lora = LoraFactors { a: a.clone(), b: b.clone(), scale: case.scale, dropout };
        B::lora_linear(x.clone(), w.clone(), lora)
    } else {
        let h = x.clone().cast(FloatDType::F32);
        let h = match case.mask.as_ref().map(|v| f32_tensor::<B, 2>(v, [m, k], device)) {
            Some(m) => h * m / KEEP,
            None => h,
        };
        let dtype = x.dtype();
        x.clone().matmul(w.clone()) + (h.matmul(a.clone()) * case.scale).matmul(b.clone()).cast(dtype_of(dtype))
    };
    let dy = f32_tensor::<B, 2>(&case.dy, [m, n], device);
    let grads = (y.clone().cast(FloatDType::F32) * dy).sum().backward();
    let grad = |t: &Tensor<B, 2>| values(t.grad(&grads).expect("a gradient"));
    [values(y), grad(&x), grad(&w), grad(&a), grad(&b)]
}

fn dtype_of(d: DType) -> FloatDType {
    match d {
        DType::BF16 => FloatDType::BF16,
        DType::F16 => FloatDType::F16,
        _ => FloatDType::F32,
    }
}

const OUTPUTS: [&str; 5] = ["output", "dx", "dw", "dA", "dB"];

/// The op on `B` against the plain-Burn maths on NdArray from the values `B` stores.
fn lora_matches_reference<B: AutodiffBackend + LinearBackend>(device: &B::Device, tolerance: f32) {
    for dims in LORA_SHAPES {
        for seed in SEEDS {
            for dropout in [false, true] {
                let case = LoraCase::random(seed, dims, dropout);
                let got = lora_outcome::<B>(&case, device, true);
                let want = lora_outcome::<Reference>(&case.stored_on::<B>(device), &Default::default(), false);
                for (i, name) in OUTPUTS.iter().enumerate() {
                    assert_close(&format!("lora {dims:?} seed={seed} dropout={dropout} {name}"), &got[i], &want[i], tolerance);
                }
            }
        }
    }
}

#[test]
fn lora_linear_matches_autodiff_of_the_reference() {
    lora_matches_reference::<Reference>(&Default::default(), 1e-5);
}

/// Output and both gradients of `x @ w` through `linear_matmul` (3-D `x`) or `batched_matmul`,
/// or through Burn's matmul.
fn matmul_outcome<B: AutodiffBackend + LinearBackend>(seed: u64, batched: bool, device: &B::Device, ours: bool) -> [Vec<f32>; 3] {
    let (e, m, k, n) = (3, 13, 21, 9);
    let mut rng = Rng::new(seed);
    let x = tensor::<B, 3>(&rng.values(e * m * k, 1.0), [e, m, k], device).require_grad();
    let dy = tensor::<B, 3>(&rng.values(e * m * n, 1.0), [e, m, n], device);
    let (y, w) = if batched {
        let w = tensor::<B, 3>(&rng.values(e * k * n, 1.0), [e, k, n], device).require_grad();
        let y = if ours { B::batched_matmul(x.clone(), w.clone()) } else { x.clone().matmul(w.clone()) };
        (y, w)
    } else {
        let w2 = tensor::<B, 2>(&rng.values(k * n, 1.0), [k, n], device).require_grad();
        let y = if ours { B::linear_matmul(x.clone(), w2.clone()) } else { x.clone().matmul(w2.clone().unsqueeze()) };
        let grads_w = w2.clone();
        let grads = (y.clone() * dy.clone()).sum().backward();
        return [values(y), values(x.grad(&grads).expect("dx")), values(grads_w.grad(&grads).expect("dw"))];
    };
    let grads = (y.clone() * dy).sum().backward();
    [values(y), values(x.grad(&grads).expect("dx")), values(w.grad(&grads).expect("dw"))]
}

fn matmuls_match_burn<B: AutodiffBackend + LinearBackend>(device: &B::Device, tolerance: f32) {
    for seed in SEEDS {
        for batched in [false, true] {
            let got = matmul_outcome::<B>(seed, batched, device, true);
            // Burn's matmul on NdArray (on CUDA in f32 it rounds like TF32: 4e-4).
            let want = matmul_outcome::<Reference>(seed, batched, &Default::default(), false);
            for (i, name) in ["output", "dx", "dw"].iter().enumerate() {
                assert_close(&format!("matmul batched={batched} seed={seed} {name}"), &got[i], &want[i], tolerance);
            }
        }
    }
}

#[test]
fn linear_and_batched_matmul_match_autodiff_of_burn_matmul() {
    matmuls_match_burn::<Reference>(&Default::default(), 1e-5);
}

/// A grouped GEMM's operands: `x [17, 21]` in groups of 5, 0, 11 and 1 rows, `w [4, 21, 9]`,
/// the upstream gradient `dy [17, 9]`, as `B` stores them.
const GROUPS: [usize; 4] = [5, 0, 11, 1];

fn grouped_operands<B: Backend>(seed: u64, device: &B::Device) -> [Vec<f32>; 3] {
    let (rows, k, n) = (17, 21, 9);
    let mut rng = Rng::new(seed);
    [rng.values(rows * k, 1.0), rng.values(GROUPS.len() * k * n, 1.0), rng.values(rows * n, 1.0)].map(|v| stored::<B>(&v, device))
}

/// Output and the gradients of `x` and `w` of `x_g @ w[g]` through `grouped_matmul`, or through
/// Burn's matmul a group at a time.
fn grouped_outcome<B: AutodiffBackend + LinearBackend>(operands: &[Vec<f32>; 3], device: &B::Device, ours: bool) -> [Vec<f32>; 3] {
    let (rows, k, n) = (17, 21, 9);
    let x = tensor::<B, 2>(&operands[0], [rows, k], device).require_grad();
    let w = tensor::<B, 3>(&operands[1], [GROUPS.len(), k, n], device).require_grad();
    let dy = tensor::<B, 2>(&operands[2], [rows, n], device);
    let y = if ours {
        B::grouped_matmul(x.clone(), w.clone(), &GROUPS)
    } else {
        let (mut parts, mut offset) = (Vec::new(), 0);
        for (g, &count) in GROUPS.iter().enumerate() {
            if count > 0 {
                parts.push(x.clone().narrow(0, offset, count).matmul(w.clone().narrow(0, g, 1).reshape([k, n])));
                offset += count;
            }
        }
        Tensor::cat(parts, 0)
    };
    let grads = (y.clone() * dy).sum().backward();
    [values(y), values(x.grad(&grads).expect("dx")), values(w.grad(&grads).expect("dw"))]
}

/// The grouped GEMM (forward, `dX` through `w`'s transposed view, `dW` by the outer form, an
/// empty group's `dW` zero) against Burn's matmul on NdArray, from the same stored values.
fn grouped_matches_burn<B: AutodiffBackend + LinearBackend>(device: &B::Device, tolerance: f32) {
    for seed in SEEDS {
        let operands = grouped_operands::<B>(seed, device);
        let got = grouped_outcome::<B>(&operands, device, true);
        let want = grouped_outcome::<Reference>(&operands, &Default::default(), false);
        for (i, name) in ["output", "dx", "dw"].iter().enumerate() {
            assert_close(&format!("grouped seed={seed} {name}"), &got[i], &want[i], tolerance);
        }
        let empty = &got[2][21 * 9..2 * 21 * 9];
        assert!(empty.iter().all(|&v| v == 0.0), "the group without rows gets a zero gradient");
    }
}

#[test]
fn grouped_matmul_matches_burn_matmul_a_group_at_a_time() {
    grouped_matches_burn::<Reference>(&Default::default(), 1e-5);
}

/// The grouped outer GEMM as one spread dense GEMM against its definition, with the narrow side
/// on either operand (widths 1 to 3, as a LoRA rank) and groups without rows, first, inside and
/// last.
fn spread_outer_matches_reference<B: LinearBackend>(device: &B::Device, tolerance: f32) {
    for counts in [[5, 0, 11, 1, 0], [0, 3, 3, 0, 11]] {
        let rows: usize = counts.iter().sum();
        for (k, n) in [(21, 3), (2, 19), (1, 1), (7, 7)] {
            for seed in SEEDS {
                let mut rng = Rng::new(seed);
                let (vx, vy) = (stored::<B>(&rng.values(rows * k, 1.0), device), stored::<B>(&rng.values(rows * n, 1.0), device));
                let got = gemm_grouped_outer_spread::<B>(tensor(&vx, [rows, k], device), tensor(&vy, [rows, n], device), &counts);
                assert_eq!(got.dims(), [counts.len(), k, n]);
                let cpu = Default::default();
                let want = reference_gemm_grouped_outer::<Cpu>(tensor(&vx, [rows, k], &cpu), tensor(&vy, [rows, n], &cpu), &counts);
                assert_close(&format!("spread outer {counts:?} k={k} n={n} seed={seed}"), &values(got), &values(want), tolerance);
            }
        }
    }
}

#[test]
fn spread_outer_gemm_matches_the_grouped_definition() {
    spread_outer_matches_reference::<Reference>(&Default::default(), 1e-5);
}

/// `alpha op(a) op(b) (+ acc)` through `B::gemm_scaled` for every transpose pair, with and
/// without an accumulator, alpha 1 and not, output f32 and the storage dtype, against
/// [`reference_gemm_scaled`] on NdArray.
fn gemm_matches_reference<B: LinearBackend>(device: &B::Device, tolerance: f32) {
    let (m, k, n) = (37, 45, 29);
    for seed in SEEDS {
        let mut rng = Rng::new(seed);
        let (va, vb, vc) = (rng.values(m * k, 1.0), rng.values(k * n, 1.0), rng.values(m * n, 1.0));
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let sa = if ta { [k, m] } else { [m, k] };
            let sb = if tb { [n, k] } else { [k, n] };
            let storage = tensor::<B, 1>(&[0.0], [1], device).dtype();
            for out in [DType::F32, storage] {
                for (with_acc, alpha) in [(false, 1.0), (true, 1.0), (false, 0.37), (true, -2.5)] {
                    let acc = with_acc.then(|| tensor::<B, 2>(&vc, [m, n], device).cast(dtype_of(out)));
                    let (a, b) = (tensor(&va, sa, device), tensor(&vb, sb, device));
                    let got = values(if alpha == 1.0 { B::gemm(a, ta, b, tb, out, acc) } else { B::gemm_scaled(a, ta, b, tb, alpha, out, acc) });
                    let cpu = Default::default();
                    let racc = with_acc.then(|| tensor::<Cpu, 2>(&stored::<B>(&vc, device), [m, n], &cpu));
                    let want = values(reference_gemm_scaled::<Cpu>(
                        tensor(&stored::<B>(&va, device), sa, &cpu),
                        ta,
                        tensor(&stored::<B>(&vb, device), sb, &cpu),
                        tb,
                        alpha,
                        DType::F32,
                        racc,
                    ));
                    let case = format!("gemm ta={ta} tb={tb} out={out:?} acc={with_acc} alpha={alpha} seed={seed}");
                    assert_close(&case, &got, &want, tolerance);
                }
            }
        }
    }
}

fn wgpu_device() -> WgpuDevice {
    WgpuDevice::default()
}

#[test]
fn wgpu_lora_linear_matches_reference() {
    lora_matches_reference::<Autodiff<Wgpu>>(&wgpu_device(), 1e-4);
}

#[test]
fn wgpu_linear_and_batched_matmul_match_burn_matmul() {
    matmuls_match_burn::<Autodiff<Wgpu>>(&wgpu_device(), 1e-4);
}

#[test]
fn wgpu_grouped_matmul_matches_burn_matmul() {
    grouped_matches_burn::<Autodiff<Wgpu>>(&wgpu_device(), 1e-4);
}

#[test]
fn wgpu_gemm_matches_reference() {
    gemm_matches_reference::<Wgpu>(&wgpu_device(), 1e-4);
}

#[test]
fn wgpu_spread_outer_gemm_matches_the_grouped_definition() {
    spread_outer_matches_reference::<Wgpu>(&wgpu_device(), 1e-4);
}

/// The same on CUDA (cuBLAS), f32 and bf16 (the reference in f32 from the bf16 values; outputs
/// rounded once to bf16, 2^-8 relative): `cargo test -p kernels-cubecl --features cuda -- --ignored`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use burn::backend::cuda::CudaDevice;

    type CudaF32 = burn::backend::Cuda<f32, i32>;
    type CudaBf16 = burn::backend::Cuda<burn::tensor::bf16, i32>;

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_f32_gemms_match_reference() {
        let device = CudaDevice::default();
        gemm_matches_reference::<CudaF32>(&device, 1e-5);
        matmuls_match_burn::<Autodiff<CudaF32>>(&device, 1e-4);
        lora_matches_reference::<Autodiff<CudaF32>>(&device, 1e-5);
        grouped_matches_burn::<Autodiff<CudaF32>>(&device, 1e-5);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_bf16_gemms_match_reference() {
        let device = CudaDevice::default();
        gemm_matches_reference::<CudaBf16>(&device, 1e-2);
        lora_matches_reference::<Autodiff<CudaBf16>>(&device, 2e-2);
        grouped_matches_burn::<Autodiff<CudaBf16>>(&device, 1e-2);
    }
}
