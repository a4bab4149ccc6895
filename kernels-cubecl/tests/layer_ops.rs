//! RMSNorm, SwiGLU and the rotary embedding as fused ops, against their definitions:
//! - each op's written-out backward (the trait's plain-Burn default, on NdArray) against autodiff
//!   of `kernels_cubecl::reference`, output and every input's gradient;
//! - each CubeCL kernel (RMSNorm, SwiGLU, rotary; wgpu here: lavapipe on machines without a GPU; CUDA f32
//!   and bf16 in the ignored tests) against the plain-Burn default on the same backend, forward
//!   and backward;
//! - the whole op under `Autodiff` of the CubeCL backend against the reference on NdArray;
//! - q/k/v packed (the projection to the attention as one tensor), gate/up packed (SwiGLU of one
//!   gate/up projection), and the residual add fused with RMSNorm, against the ops they replace.
//!
//! Shapes are odd (no power of two, rows beyond one grid axis for the row kernels), inputs are
//! views where the model passes views (heads swapped with positions, halves of a wider tensor),
//! and every case runs for several seeds.

use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use kernels_cubecl::layer_ops::{rms_norm_grad, rms_norm_parts, rotary_grad, rotary_value, swiglu_grad, swiglu_value, NormWanted};
use kernels_cubecl::gate_up::{swiglu_packed_grad, swiglu_packed_value};
use kernels_cubecl::qkv::{qkv_rotary_grad, qkv_rotary_value};
use kernels_cubecl::residual_norm::add_rms_norm_parts;
use kernels_cubecl::{
    fused_add_rms_norm, fused_rms_norm, fused_rotary, fused_swiglu, fused_swiglu_packed, memory_efficient_attention, qkv_attention, qkv_rotary, reference, AttentionKernel, AttentionOptions,
    FusedAttentionBackend, FusedLayerBackend, QkvLayout,
};

type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;
type Reference = Autodiff<NdArray<f32>>;

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
const EPS: f64 = 1e-6;

fn tensor<B: Backend, const D: usize>(values: &[f32], shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Largest `|got - want|` relative to the largest `|want|`.
fn assert_close(label: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{label}: lengths");
    assert!(got.iter().all(|g| g.is_finite()), "{label}: non-finite values");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let error = got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale;
    let first: Vec<(usize, f32, f32)> =
        got.iter().zip(want).enumerate().filter(|(_, (g, w))| (*g - *w).abs() > tolerance * scale).map(|(i, (g, w))| (i, *g, *w)).take(4).collect();
    let wrong = got.iter().zip(want).filter(|(g, w)| (*g - *w).abs() > tolerance * scale).count();
    assert!(error < tolerance, "{label}: relative error {error}; {wrong} of {} wrong, first (index, got, want): {first:?}", got.len());
}

/// `[rows, n]` inputs of RMSNorm: rows of varying scale, weights around 1.
struct NormCase {
    rows: usize,
    n: usize,
    x: Vec<f32>,
    weight: Vec<f32>,
    grad: Vec<f32>,
}

/// (rows, n): a row shorter than a cube, rows longer than one (each unit reads several), a
/// q/k-norm-like case with more rows than one grid axis holds.
const NORM_SHAPES: [(usize, usize); 3] = [(7, 5), (33, 700), (70_000, 4)];

impl NormCase {
    fn random(seed: u64, (rows, n): (usize, usize)) -> Self {
        let mut rng = Rng::new(seed);
        let mut x = rng.values(rows * n, 2.0);
        for (r, row) in x.chunks_mut(n).enumerate() {
            row.iter_mut().for_each(|v| *v *= 1.0 + (r % 5) as f32);
        }
        let weight = rng.values(n, 0.5).into_iter().map(|w| 1.0 + w).collect();
        let grad = rng.values(rows * n, 1.0);
        NormCase { rows, n, x, weight, grad }
    }
}

/// Output, dx and dweight of `norm` under autodiff, the upstream gradient random.
fn norm_outcome<B: AutodiffBackend>(case: &NormCase, device: &B::Device, norm: fn(Tensor<B, 3>, Tensor<B, 1>, f64) -> Tensor<B, 3>) -> [Vec<f32>; 3] {
    // [2, rows / 2, n] where it divides: the public op takes any rank.
    let shape = if case.rows % 2 == 0 { [2, case.rows / 2, case.n] } else { [1, case.rows, case.n] };
    let x = tensor::<B, 3>(&case.x, shape, device).require_grad();
    let w = tensor::<B, 1>(&case.weight, [case.n], device).require_grad();
    let y = norm(x.clone(), w.clone(), EPS);
    let grads = (y.clone() * tensor::<B, 3>(&case.grad, shape, device)).sum().backward();
    [values(y), values(x.grad(&grads).expect("dx")), values(w.grad(&grads).expect("dweight"))]
}

#[test]
fn rms_norm_backward_matches_autodiff_of_the_reference() {
    for dims in NORM_SHAPES {
        for seed in SEEDS {
            let case = NormCase::random(seed, dims);
            let want = norm_outcome::<Reference>(&case, &Default::default(), reference::rms_norm);
            let got = norm_outcome::<Reference>(&case, &Default::default(), fused_rms_norm);
            for (name, g, w) in [("output", &got[0], &want[0]), ("dx", &got[1], &want[1]), ("dweight", &got[2], &want[2])] {
                assert_close(&format!("rms_norm {dims:?} seed={seed} {name}"), g, w, 1e-5);
            }
        }
    }
}

/// The RMSNorm row kernels of `B` against the plain-Burn definitions on the same backend, with
/// `x` and the upstream gradient as views when `strided` (the transpose of an `[n, rows]`
/// tensor: every element a stride apart).
fn norm_kernels_match_definition<B: FusedLayerBackend>(device: &B::Device, tolerance: f32) {
    for dims in NORM_SHAPES {
        for strided in [false, true] {
            for seed in SEEDS {
                let case = NormCase::random(seed, dims);
                let (rows, n) = dims;
                let input = |v: &[f32]| rows_input::<B>(v, (rows, n), strided, device);
                let (x, grad) = (input(&case.x), input(&case.grad));
                let weight = tensor::<B, 1>(&case.weight, [n], device);
                let label = format!("rms_norm {dims:?} strided={strided} seed={seed}");
                let (want_y, want_r) = rms_norm_parts(x.clone(), weight.clone(), EPS);
                let (got_y, got_r) = B::rms_norm_forward(x.clone(), weight.clone(), EPS);
                assert_close(&format!("{label} output"), &values(got_y), &values(want_y), tolerance);
                assert_close(&format!("{label} rstd"), &values(got_r.clone()), &values(want_r), tolerance);
                for wanted in [NormWanted { x: true, weight: true }, NormWanted { x: true, weight: false }, NormWanted { x: false, weight: true }] {
                    let args = (x.clone(), weight.clone(), got_r.clone(), grad.clone());
                    let want = rms_norm_grad(args.0.clone(), args.1.clone(), args.2.clone(), args.3.clone(), wanted);
                    let got = B::rms_norm_backward(args.0, args.1, args.2, args.3, wanted);
                    assert_eq!((got.0.is_some(), got.1.is_some()), (wanted.x, wanted.weight), "{label}");
                    if let (Some(g), Some(w)) = (got.0, want.0) {
                        assert_close(&format!("{label} dx {wanted:?}"), &values(g), &values(w), tolerance);
                    }
                    if let (Some(g), Some(w)) = (got.1, want.1) {
                        assert_close(&format!("{label} dweight {wanted:?}"), &values(g), &values(w), tolerance);
                    }
                }
            }
        }
    }
}

/// What is added to a [`NormCase`]'s `x` (the residual) and the upstream gradient of the sum.
fn residual_parts(case: &NormCase, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed ^ 0x5eed);
    (rng.values(case.rows * case.n, 3.0), rng.values(case.rows * case.n, 1.0))
}

/// `h = x + delta` and `rms_norm(h)` under autodiff, both outputs in the loss: the fused op, or
/// the add then the reference norm; h, the norm's output, dx, d delta and dweight.
fn add_norm_outcome<B: AutodiffBackend + FusedLayerBackend>(case: &NormCase, seed: u64, device: &B::Device, fused: bool) -> [Vec<f32>; 5] {
    let shape = if case.rows % 2 == 0 { [2, case.rows / 2, case.n] } else { [1, case.rows, case.n] };
    let (delta, grad_h) = residual_parts(case, seed);
    let x = tensor::<B, 3>(&case.x, shape, device).require_grad();
    let delta = tensor::<B, 3>(&delta, shape, device).require_grad();
    let w = tensor::<B, 1>(&case.weight, [case.n], device).require_grad();
    let (h, y) = match fused {
        true => fused_add_rms_norm(x.clone(), delta.clone(), w.clone(), EPS),
        false => {
            let h = x.clone() + delta.clone();
            (h.clone(), reference::rms_norm(h, w.clone(), EPS))
        }
    };
    let loss = (h.clone() * tensor::<B, 3>(&grad_h, shape, device)).sum() + (y.clone() * tensor::<B, 3>(&case.grad, shape, device)).sum();
    let grads = loss.backward();
    [values(h), values(y), values(x.grad(&grads).expect("dx")), values(delta.grad(&grads).expect("d delta")), values(w.grad(&grads).expect("dweight"))]
}

const ADD_NORM_OUTPUTS: [&str; 5] = ["h", "output", "dx", "d delta", "dweight"];

#[test]
fn add_rms_norm_matches_the_add_then_the_norm() {
    for dims in NORM_SHAPES {
        for seed in SEEDS {
            let case = NormCase::random(seed, dims);
            let want = add_norm_outcome::<Reference>(&case, seed, &Default::default(), false);
            let got = add_norm_outcome::<Reference>(&case, seed, &Default::default(), true);
            for (i, name) in ADD_NORM_OUTPUTS.iter().enumerate() {
                assert_close(&format!("add_rms_norm {dims:?} seed={seed} {name}"), &got[i], &want[i], 1e-5);
            }
        }
    }
}

/// The fused add + RMSNorm row kernel of `B` against its plain-Burn definition, `x` and
/// `delta` as views when `strided`.
fn add_norm_kernel_matches_definition<B: FusedLayerBackend>(device: &B::Device, tolerance: f32) {
    for dims in NORM_SHAPES {
        for strided in [false, true] {
            for seed in SEEDS {
                let case = NormCase::random(seed, dims);
                let (rows, n) = dims;
                let input = |v: &[f32]| rows_input::<B>(v, (rows, n), strided, device);
                let (x, delta) = (input(&case.x), input(&residual_parts(&case, seed).0));
                let weight = tensor::<B, 1>(&case.weight, [n], device);
                let label = format!("add_rms_norm {dims:?} strided={strided} seed={seed}");
                let want = add_rms_norm_parts(x.clone(), delta.clone(), weight.clone(), EPS);
                let got = B::add_rms_norm_forward(x, delta, weight, EPS);
                assert_close(&format!("{label} h"), &values(got.0), &values(want.0), tolerance);
                assert_close(&format!("{label} output"), &values(got.1), &values(want.1), tolerance);
                assert_close(&format!("{label} rstd"), &values(got.2), &values(want.2), tolerance);
            }
        }
    }
}

/// `v` as a `[rows, n]` tensor: contiguous, or when `strided` the transpose of an `[n, rows]`
/// one (every element a stride apart).
fn rows_input<B: Backend>(v: &[f32], (rows, n): (usize, usize), strided: bool, device: &B::Device) -> Tensor<B, 2> {
    match strided {
        false => tensor::<B, 2>(v, [rows, n], device),
        true => tensor::<B, 2>(&transposed(v, rows, n), [n, rows], device).transpose(),
    }
}

/// `v` (`[rows, n]`, row-major) as `[n, rows]`.
fn transposed(v: &[f32], rows: usize, n: usize) -> Vec<f32> {
    (0..n * rows).map(|i| v[(i % rows) * n + i / rows]).collect()
}

/// SwiGLU inputs `[a, b, c]`, with `strided` gate and up as the two halves of one `[a, b, 2c]`
/// tensor (a fused gate/up projection's output).
struct SwigluCase {
    dims: [usize; 3],
    strided: bool,
    gate: Vec<f32>,
    up: Vec<f32>,
    grad: Vec<f32>,
}

const SWIGLU_SHAPES: [[usize; 3]; 4] = [[1, 1, 1], [2, 7, 13], [3, 37, 300], [2, 5, 64]];

impl SwigluCase {
    fn random(seed: u64, dims: [usize; 3], strided: bool) -> Self {
        let mut rng = Rng::new(seed);
        let n = dims.iter().product::<usize>();
        SwigluCase { dims, strided, gate: rng.values(n, 6.0), up: rng.values(n, 2.0), grad: rng.values(n, 1.0) }
    }

    fn inputs<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let gate = tensor::<B, 3>(&self.gate, self.dims, device);
        let up = tensor::<B, 3>(&self.up, self.dims, device);
        if !self.strided {
            return (gate, up);
        }
        let c = self.dims[2];
        let both = Tensor::cat(vec![gate, up], 2);
        (both.clone().narrow(2, 0, c), both.narrow(2, c, c))
    }
}

fn swiglu_outcome<B: AutodiffBackend>(case: &SwigluCase, device: &B::Device, op: fn(Tensor<B, 3>, Tensor<B, 3>) -> Tensor<B, 3>) -> [Vec<f32>; 3] {
    let gate = tensor::<B, 3>(&case.gate, case.dims, device).require_grad();
    let up = tensor::<B, 3>(&case.up, case.dims, device).require_grad();
    let (g_in, u_in) = if case.strided {
        let c = case.dims[2];
        let both = Tensor::cat(vec![gate.clone(), up.clone()], 2);
        (both.clone().narrow(2, 0, c), both.narrow(2, c, c))
    } else {
        (gate.clone(), up.clone())
    };
    let y = op(g_in, u_in);
    let grads = (y.clone() * tensor::<B, 3>(&case.grad, case.dims, device)).sum().backward();
    [values(y), values(gate.grad(&grads).expect("d gate")), values(up.grad(&grads).expect("d up"))]
}

#[test]
fn swiglu_backward_matches_autodiff_of_the_reference() {
    for dims in SWIGLU_SHAPES {
        for strided in [false, true] {
            for seed in SEEDS {
                let case = SwigluCase::random(seed, dims, strided);
                let want = swiglu_outcome::<Reference>(&case, &Default::default(), reference::swiglu);
                let got = swiglu_outcome::<Reference>(&case, &Default::default(), fused_swiglu);
                for (name, g, w) in [("output", &got[0], &want[0]), ("d gate", &got[1], &want[1]), ("d up", &got[2], &want[2])] {
                    assert_close(&format!("swiglu {dims:?} strided={strided} seed={seed} {name}"), g, w, 1e-5);
                }
            }
        }
    }
}

fn swiglu_kernels_match_definition<B: FusedLayerBackend>(device: &B::Device, tolerance: f32) {
    for dims in SWIGLU_SHAPES {
        for strided in [false, true] {
            for seed in SEEDS {
                let case = SwigluCase::random(seed, dims, strided);
                let (gate, up) = case.inputs::<B>(device);
                let label = format!("swiglu {dims:?} strided={strided} seed={seed}");
                let want = swiglu_value(gate.clone(), up.clone());
                assert_close(&format!("{label} output"), &values(B::swiglu_forward(gate.clone(), up.clone())), &values(want), tolerance);
                // The upstream gradient as a view too (a transposed one) when strided.
                let grad = match strided {
                    false => tensor::<B, 3>(&case.grad, dims, device),
                    true => tensor::<B, 3>(&case.grad, [dims[0], dims[2], dims[1]], device).swap_dims(1, 2),
                };
                for wanted in [[true, true], [true, false], [false, true]] {
                    let want = swiglu_grad(gate.clone(), up.clone(), grad.clone(), wanted);
                    let got = B::swiglu_backward(gate.clone(), up.clone(), grad.clone(), wanted);
                    assert_eq!([got.0.is_some(), got.1.is_some()], wanted, "{label}");
                    for (name, g, w) in [("d gate", got.0, want.0), ("d up", got.1, want.1)] {
                        if let (Some(g), Some(w)) = (g, w) {
                            assert_close(&format!("{label} {name} {wanted:?}"), &values(g), &values(w), tolerance);
                        }
                    }
                }
            }
        }
    }
}

/// SwiGLU of the packed gate/up tensor `[a, b, 2c]` (a leaf) under autodiff: the packed op, or
/// the reference on its two halves as `narrow` views; the output and the packed gradient.
fn swiglu_packed_outcome<B: AutodiffBackend + FusedLayerBackend>(case: &SwigluCase, device: &B::Device, packed_op: bool) -> [Vec<f32>; 2] {
    let c = case.dims[2];
    let gate = tensor::<B, 3>(&case.gate, case.dims, device);
    let up = tensor::<B, 3>(&case.up, case.dims, device);
    let packed = Tensor::cat(vec![gate, up], 2).require_grad();
    let y = match packed_op {
        true => fused_swiglu_packed(packed.clone()),
        false => reference::swiglu(packed.clone().narrow(2, 0, c), packed.clone().narrow(2, c, c)),
    };
    let grads = (y.clone() * tensor::<B, 3>(&case.grad, case.dims, device)).sum().backward();
    [values(y), values(packed.grad(&grads).expect("d packed"))]
}

#[test]
fn packed_swiglu_matches_swiglu_of_the_halves() {
    for dims in SWIGLU_SHAPES {
        for seed in SEEDS {
            let case = SwigluCase::random(seed, dims, false);
            let want = swiglu_packed_outcome::<Reference>(&case, &Default::default(), false);
            let got = swiglu_packed_outcome::<Reference>(&case, &Default::default(), true);
            assert_close(&format!("packed swiglu {dims:?} seed={seed} output"), &got[0], &want[0], 1e-5);
            assert_close(&format!("packed swiglu {dims:?} seed={seed} d packed"), &got[1], &want[1], 1e-5);
        }
    }
}

/// The packed SwiGLU kernels against their plain-Burn definitions: the packed input contiguous
/// and as a view (a narrowed wider tensor), the upstream gradient as a transposed view.
fn swiglu_packed_kernels_match_definition<B: FusedLayerBackend>(device: &B::Device, tolerance: f32) {
    for dims in SWIGLU_SHAPES {
        for strided in [false, true] {
            for seed in SEEDS {
                let case = SwigluCase::random(seed, dims, false);
                let [a, b, c] = dims;
                let (gate, up) = case.inputs::<B>(device);
                let packed = match strided {
                    false => Tensor::cat(vec![gate, up], 2),
                    true => Tensor::cat(vec![gate, up, Tensor::ones([a, b, 3], device)], 2).narrow(2, 0, 2 * c),
                };
                let label = format!("packed swiglu {dims:?} strided={strided} seed={seed}");
                let want = swiglu_packed_value(packed.clone());
                assert_close(&format!("{label} output"), &values(B::swiglu_packed_forward(packed.clone())), &values(want), tolerance);
                let grad = tensor::<B, 3>(&case.grad, [a, c, b], device).swap_dims(1, 2);
                let want = swiglu_packed_grad(packed.clone(), grad.clone());
                assert_close(&format!("{label} d packed"), &values(B::swiglu_packed_backward(packed, grad)), &values(want), tolerance);
            }
        }
    }
}

/// Rotary inputs `[batch, heads, seq, d]`: `swapped` reads `x` as the model does, `[batch, seq,
/// heads, d]` with heads and positions swapped. The tables are transformers' (`rope_cos_sin`
/// of positions that differ per row).
struct RotaryCase {
    dims: [usize; 4],
    swapped: bool,
    x: Vec<f32>,
    grad: Vec<f32>,
    positions: Vec<i64>,
}

const ROTARY_SHAPES: [[usize; 4]; 4] = [[1, 1, 1, 2], [2, 3, 7, 8], [2, 5, 33, 34], [1, 4, 6, 128]];

impl RotaryCase {
    fn random(seed: u64, dims: [usize; 4], swapped: bool) -> Self {
        let mut rng = Rng::new(seed);
        let n = dims.iter().product::<usize>();
        let [b, _, s, _] = dims;
        let positions = (0..b * s).map(|i| (i % s) as i64 * (1 + (i / s) as i64) + (rng.next() % 3) as i64).collect();
        RotaryCase { dims, swapped, x: rng.values(n, 2.0), grad: rng.values(n, 1.0), positions }
    }

    fn tables<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, _, s, d] = self.dims;
        let positions = Tensor::<B, 2, burn::tensor::Int>::from_data(TensorData::new(self.positions.clone(), [b, s]), device);
        let inv_freq = (0..d / 2).map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / d as f32)).collect::<Vec<_>>();
        reference::rope_cos_sin(positions, tensor::<B, 1>(&inv_freq, [d / 2], device))
    }

    /// `values` as the op's `[batch, heads, seq, d]` input.
    fn input<B: Backend>(&self, values: &[f32], device: &B::Device) -> Tensor<B, 4> {
        let [b, h, s, d] = self.dims;
        match self.swapped {
            false => tensor::<B, 4>(values, self.dims, device),
            true => tensor::<B, 4>(values, [b, s, h, d], device).swap_dims(1, 2),
        }
    }
}

fn rotary_outcome<B: AutodiffBackend>(case: &RotaryCase, device: &B::Device, op: fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>) -> [Vec<f32>; 2] {
    let [b, h, s, d] = case.dims;
    let leaf = match case.swapped {
        false => tensor::<B, 4>(&case.x, case.dims, device),
        true => tensor::<B, 4>(&case.x, [b, s, h, d], device),
    }
    .require_grad();
    let x = if case.swapped { leaf.clone().swap_dims(1, 2) } else { leaf.clone() };
    let (cos, sin) = case.tables::<B>(device);
    let y = op(x, cos, sin);
    let grads = (y.clone() * tensor::<B, 4>(&case.grad, case.dims, device)).sum().backward();
    [values(y), values(leaf.grad(&grads).expect("dx"))]
}

#[test]
fn rotary_backward_matches_autodiff_of_the_reference() {
    for dims in ROTARY_SHAPES {
        for swapped in [false, true] {
            for seed in SEEDS {
                let case = RotaryCase::random(seed, dims, swapped);
                let want = rotary_outcome::<Reference>(&case, &Default::default(), reference::rotary);
                let got = rotary_outcome::<Reference>(&case, &Default::default(), fused_rotary);
                assert_close(&format!("rotary {dims:?} swapped={swapped} seed={seed} output"), &got[0], &want[0], 1e-5);
                assert_close(&format!("rotary {dims:?} swapped={swapped} seed={seed} dx"), &got[1], &want[1], 1e-5);
            }
        }
    }
}

fn rotary_kernels_match_definition<B: FusedLayerBackend>(device: &B::Device, tolerance: f32) {
    for dims in ROTARY_SHAPES {
        for swapped in [false, true] {
            for seed in SEEDS {
                let case = RotaryCase::random(seed, dims, swapped);
                let (cos, sin) = case.tables::<B>(device);
                let label = format!("rotary {dims:?} swapped={swapped} seed={seed}");
                let x = case.input::<B>(&case.x, device);
                let want = rotary_value(x.clone(), cos.clone(), sin.clone());
                assert_close(&format!("{label} output"), &values(B::rotary_forward(x, cos.clone(), sin.clone())), &values(want), tolerance);
                let grad = case.input::<B>(&case.grad, device);
                let want = rotary_grad(grad.clone(), cos.clone(), sin.clone());
                assert_close(&format!("{label} dx"), &values(B::rotary_backward(grad, cos.clone(), sin.clone())), &values(want), tolerance);
                // `x` whose last dimension is not unit-stride: the view of a `[.., d, seq]` tensor.
                let [b, h, s, d] = dims;
                let blocks: Vec<f32> = case.x.chunks(s * d).flat_map(|block| transposed(block, s, d)).collect();
                let x = tensor::<B, 4>(&blocks, [b, h, d, s], device).swap_dims(2, 3);
                let want = rotary_value(x.clone(), cos.clone(), sin.clone());
                assert_close(&format!("{label} output, x transposed"), &values(B::rotary_forward(x, cos, sin)), &values(want), tolerance);
            }
        }
    }
}

/// Every fused op under `Autodiff<B>` against the reference under autodiff on NdArray.
fn autodiff_ops_match_reference<B: FusedLayerBackend>(device: &B::Device, tolerance: f32) {
    for seed in SEEDS {
        let case = NormCase::random(seed, (33, 700));
        let want = norm_outcome::<Reference>(&case, &Default::default(), reference::rms_norm);
        let got = norm_outcome::<Autodiff<B>>(&case, device, fused_rms_norm);
        for (i, name) in ["output", "dx", "dweight"].iter().enumerate() {
            assert_close(&format!("autodiff rms_norm seed={seed} {name}"), &got[i], &want[i], tolerance);
        }
        let case = NormCase::random(seed, (33, 700));
        let want = add_norm_outcome::<Reference>(&case, seed, &Default::default(), false);
        let got = add_norm_outcome::<Autodiff<B>>(&case, seed, device, true);
        for (i, name) in ADD_NORM_OUTPUTS.iter().enumerate() {
            assert_close(&format!("autodiff add_rms_norm seed={seed} {name}"), &got[i], &want[i], tolerance);
        }
        let case = SwigluCase::random(seed, [2, 7, 13], true);
        let want = swiglu_outcome::<Reference>(&case, &Default::default(), reference::swiglu);
        let got = swiglu_outcome::<Autodiff<B>>(&case, device, fused_swiglu);
        for (i, name) in ["output", "d gate", "d up"].iter().enumerate() {
            assert_close(&format!("autodiff swiglu seed={seed} {name}"), &got[i], &want[i], tolerance);
        }
        let case = SwigluCase::random(seed, [2, 7, 12], false);
        let want = swiglu_packed_outcome::<Reference>(&case, &Default::default(), false);
        let got = swiglu_packed_outcome::<Autodiff<B>>(&case, device, true);
        for (i, name) in ["output", "d packed"].iter().enumerate() {
            assert_close(&format!("autodiff packed swiglu seed={seed} {name}"), &got[i], &want[i], tolerance);
        }
        let case = RotaryCase::random(seed, [2, 3, 7, 8], true);
        let want = rotary_outcome::<Reference>(&case, &Default::default(), reference::rotary);
        let got = rotary_outcome::<Autodiff<B>>(&case, device, fused_rotary);
        for (i, name) in ["output", "dx"].iter().enumerate() {
            assert_close(&format!("autodiff rotary seed={seed} {name}"), &got[i], &want[i], tolerance);
        }
    }
}

/// A packed q/k/v case: the projection's output `[batch, seq, heads * d]`, the upstream
/// gradient of the attention's output and of the packed tensor, and positions for the tables.
struct QkvCase {
    layout: QkvLayout,
    projected: Vec<f32>,
    grad_output: Vec<f32>,
    grad_packed: Vec<f32>,
    rotary: RotaryCase,
}

/// `(batch, seq, q_heads, kv_heads, head_dim)`: GQA ratios 2, 3 and 1, odd lengths, one head
/// dim that is not a power of two.
const QKV_LAYOUTS: [(usize, usize, usize, usize, usize); 3] = [(2, 5, 4, 2, 8), (1, 7, 3, 1, 6), (2, 9, 2, 2, 34)];

impl QkvCase {
    fn random(seed: u64, (batch, seq, q_heads, kv_heads, head_dim): (usize, usize, usize, usize, usize)) -> Self {
        let layout = QkvLayout { batch, seq, q_heads, kv_heads, head_dim };
        let mut rng = Rng::new(seed + 100);
        QkvCase {
            layout,
            projected: rng.values(layout.len(), 2.0),
            grad_output: rng.values(batch * q_heads * seq * head_dim, 1.0),
            grad_packed: rng.values(layout.len(), 1.0),
            rotary: RotaryCase::random(seed, [batch, 1, seq, head_dim], false),
        }
    }

    fn projected<B: Backend>(&self, device: &B::Device) -> Tensor<B, 3> {
        let l = self.layout;
        tensor::<B, 3>(&self.projected, [l.batch, l.seq, l.heads() * l.head_dim], device)
    }
}

/// The attention's output and the projection's gradient, through the packed ops or (`apart`)
/// through the ops they replace: q, k, v narrowed from the projection, each rotated apart; the
/// attention by `kernel`.
fn qkv_outcome<B: AutodiffBackend + FusedLayerBackend + FusedAttentionBackend>(
    case: &QkvCase,
    device: &B::Device,
    apart: bool,
    kernel: AttentionKernel,
) -> [Vec<f32>; 2] {
    let l = case.layout;
    let projected = case.projected::<B>(device).require_grad();
    let (cos, sin) = case.rotary.tables::<B>(device);
    let blocked = reference::attention_mask::<B>(None, l.batch, l.seq, device);
    let scale = (l.head_dim as f64).powf(-0.5);
    let options = AttentionOptions { block_q: Some(3), causal: true, kernel };
    let y = if apart {
        let heads = projected.clone().reshape([l.batch, l.seq, l.heads(), l.head_dim]);
        let [q, k, v] = l.parts().map(|part| heads.clone().narrow(2, part.first_head, part.heads).swap_dims(1, 2));
        let (q, k) = (fused_rotary(q, cos.clone(), sin.clone()), fused_rotary(k, cos, sin));
        memory_efficient_attention(q, k, v, scale, blocked, options)
    } else {
        qkv_attention(qkv_rotary(projected.clone(), cos, sin, l), l, scale, blocked, options)
    };
    let upstream = tensor::<B, 4>(&case.grad_output, [l.batch, l.q_heads, l.seq, l.head_dim], device);
    let grads = (y.clone() * upstream).sum().backward();
    [values(y), values(projected.grad(&grads).expect("d projected"))]
}

#[test]
fn packed_qkv_matches_the_ops_it_replaces() {
    for seed in SEEDS {
        for dims in QKV_LAYOUTS {
            let case = QkvCase::random(seed, dims);
            let want = qkv_outcome::<Reference>(&case, &Default::default(), true, AttentionKernel::Blockwise);
            let got = qkv_outcome::<Reference>(&case, &Default::default(), false, AttentionKernel::Blockwise);
            assert_close(&format!("packed qkv {dims:?} seed={seed} output"), &got[0], &want[0], 1e-5);
            assert_close(&format!("packed qkv {dims:?} seed={seed} d projected"), &got[1], &want[1], 1e-5);
        }
    }
}

/// The packed rotary's kernels against its plain-Burn definition on `B`, both directions, and
/// the packed ops under `Autodiff<B>` against the reference on NdArray.
fn qkv_kernels_match_definition<B: FusedLayerBackend + FusedAttentionBackend>(device: &B::Device, tolerance: f32) {
    for seed in SEEDS {
        for dims in QKV_LAYOUTS {
            let case = QkvCase::random(seed, dims);
            let label = format!("qkv rotary {dims:?} seed={seed}");
            let (cos, sin) = case.rotary.tables::<B>(device);
            let want = qkv_rotary_value(case.projected::<B>(device), cos.clone(), sin.clone(), case.layout);
            let got = B::qkv_rotary_forward(case.projected::<B>(device), cos.clone(), sin.clone(), case.layout);
            assert_close(&format!("{label} output"), &values(got), &values(want), tolerance);
            let grad = || tensor::<B, 1>(&case.grad_packed, [case.layout.len()], device);
            let want = qkv_rotary_grad(grad(), cos.clone(), sin.clone(), case.layout);
            let got = B::qkv_rotary_backward(grad(), cos, sin, case.layout);
            assert_close(&format!("{label} d projected"), &values(got), &values(want), tolerance);
            let want = qkv_outcome::<Reference>(&case, &Default::default(), true, AttentionKernel::Blockwise);
            // The flash kernels read q, k and v as strided views of the projection.
            for kernel in [AttentionKernel::Blockwise, AttentionKernel::Flash] {
                let got = qkv_outcome::<Autodiff<B>>(&case, device, false, kernel);
                assert_close(&format!("autodiff packed qkv {dims:?} seed={seed} {kernel:?} output"), &got[0], &want[0], tolerance);
                assert_close(&format!("autodiff packed qkv {dims:?} seed={seed} {kernel:?} d projected"), &got[1], &want[1], tolerance);
            }
        }
    }
}

#[test]
fn untracked_weight_gets_no_gradient() {
    let case = NormCase::random(1, (7, 5));
    let device = Default::default();
    let x = tensor::<Reference, 2>(&case.x, [7, 5], &device).require_grad();
    let w = tensor::<Reference, 1>(&case.weight, [5], &device);
    let grads = fused_rms_norm(x.clone(), w.clone(), EPS).sum().backward();
    assert!(x.grad(&grads).is_some());
    assert!(w.grad(&grads).is_none());
}

fn wgpu_device() -> WgpuDevice {
    WgpuDevice::default()
}

#[test]
fn wgpu_norm_kernels_match_definition() {
    norm_kernels_match_definition::<Wgpu>(&wgpu_device(), 1e-5);
}

#[test]
fn wgpu_add_norm_kernel_matches_definition() {
    add_norm_kernel_matches_definition::<Wgpu>(&wgpu_device(), 1e-5);
}

#[test]
fn wgpu_swiglu_kernels_match_definition() {
    swiglu_kernels_match_definition::<Wgpu>(&wgpu_device(), 1e-5);
}

#[test]
fn wgpu_swiglu_packed_kernels_match_definition() {
    swiglu_packed_kernels_match_definition::<Wgpu>(&wgpu_device(), 1e-5);
}

#[test]
fn wgpu_rotary_kernels_match_definition() {
    rotary_kernels_match_definition::<Wgpu>(&wgpu_device(), 1e-5);
}

#[test]
fn wgpu_qkv_kernels_match_definition() {
    qkv_kernels_match_definition::<Wgpu>(&wgpu_device(), 1e-5);
}

#[test]
fn wgpu_autodiff_ops_match_reference() {
    autodiff_ops_match_reference::<Wgpu>(&wgpu_device(), 1e-5);
}

/// The same on CUDA, f32 and bf16 (storage rounded to 8 significant bits on both sides of the
/// comparison, the arithmetic in f32): `cargo test -p kernels-cubecl --features cuda -- --ignored`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use burn::backend::cuda::CudaDevice;

    type CudaF32 = burn::backend::Cuda<f32, i32>;
    type CudaBf16 = burn::backend::Cuda<burn::tensor::bf16, i32>;

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_f32_layer_kernels_match_definition() {
        assert_ne!(std::env::var("KERNELS_CUBECL_CUDA_KERNELS").as_deref(), Ok("0"), "KERNELS_CUBECL_CUDA_KERNELS=0 turns the kernels off on CUDA");
        let device = CudaDevice::default();
        norm_kernels_match_definition::<CudaF32>(&device, 1e-5);
        add_norm_kernel_matches_definition::<CudaF32>(&device, 1e-5);
        swiglu_kernels_match_definition::<CudaF32>(&device, 1e-5);
        swiglu_packed_kernels_match_definition::<CudaF32>(&device, 1e-5);
        rotary_kernels_match_definition::<CudaF32>(&device, 1e-5);
        qkv_kernels_match_definition::<CudaF32>(&device, 1e-5);
        autodiff_ops_match_reference::<CudaF32>(&device, 1e-5);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_bf16_layer_kernels_match_definition() {
        assert_ne!(std::env::var("KERNELS_CUBECL_CUDA_KERNELS").as_deref(), Ok("0"), "KERNELS_CUBECL_CUDA_KERNELS=0 turns the kernels off on CUDA");
        let device = CudaDevice::default();
        // Both sides store bf16 (relative spacing 2^-8); the kernels round once, the
        // definitions after each op.
        norm_kernels_match_definition::<CudaBf16>(&device, 2e-2);
        add_norm_kernel_matches_definition::<CudaBf16>(&device, 2e-2);
        swiglu_kernels_match_definition::<CudaBf16>(&device, 2e-2);
        swiglu_packed_kernels_match_definition::<CudaBf16>(&device, 2e-2);
        rotary_kernels_match_definition::<CudaBf16>(&device, 2e-2);
        qkv_kernels_match_definition::<CudaBf16>(&device, 3e-2);
        autodiff_ops_match_reference::<CudaBf16>(&device, 3e-2);
    }
}
