//! The multi-tensor AdamW update against its plain-Burn definition on the same backend (wgpu
//! here: lavapipe on machines without a GPU; CUDA in the ignored tests) over several steps, lists
//! longer than one launch takes, sizes that are no multiple of a cube (an empty one among them),
//! with and without weight decay and a clipping scale; the definition and the global sum of
//! squares against the same maths in f64 on the host.

use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use kernels_cubecl::optimizer::adamw_update_value;
use kernels_cubecl::{AdamWStep, AdamWTensors, FusedOptimizerBackend};

type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;

struct Rng(u64);

impl Rng {
    fn values(&mut self, n: usize, spread: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * spread
            })
            .collect()
    }
}

fn values<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn assert_close(label: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{label}: lengths");
    assert!(got.iter().all(|g| g.is_finite()), "{label}: non-finite values");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let error = got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale;
    assert!(error < tolerance, "{label}: relative error {error}");
}

const SIZES: [usize; 4] = [1, 7, 4_099, 300_001];

/// The sizes of one AdamW list: more tensors than a launch takes (15 on CUDA, up to 32
/// elsewhere), every size of [`SIZES`] and an empty tensor among them.
fn list_sizes() -> Vec<usize> {
    (0..45).map(|i| if i == 5 { 0 } else { SIZES[i % SIZES.len()] + i }).collect()
}

/// Five AdamW steps of a list of parameters from zero moments by `B`'s multi-tensor kernel and
/// by the definition, the parameters stored in `dtype`.
fn adamw_matches_definition<B: FusedOptimizerBackend>(device: &B::Device, dtype: DType, tolerance: f32) {
    let sizes = list_sizes();
    for (decay, clip) in [(0.0f64, 1.0f32), (0.1, 0.37)] {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ decay.to_bits());
        let f32_tensor = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), (device, DType::F32));
        let scale = Tensor::<B, 1>::from_data(TensorData::new(vec![clip], [1]), (device, DType::F32));
        // (From data, in their dtype: CUDA refuses a fill or a cast over no elements.)
        let zeros = |n: usize| f32_tensor(vec![0.0; n]);
        let param = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), (device, dtype));
        let state: Vec<_> = sizes.iter().map(|&n| (param(rng.values(n, 1.0)), zeros(n), zeros(n))).collect();
        let (mut got, mut want) = (state.clone(), state);
        for step in 1..=5 {
            let grads: Vec<_> = sizes.iter().map(|&n| f32_tensor(rng.values(n, 0.5))).collect();
            let s = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: decay,
                bias_correction1: 1.0 - 0.9f64.powi(step),
                bias_correction2: 1.0 - 0.999f64.powi(step),
            };
            let list = |state: Vec<(Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>)>| -> Vec<AdamWTensors<B>> {
                state.into_iter().zip(&grads).map(|((param, exp_avg, exp_avg_sq), g)| AdamWTensors { param, grad: g.clone(), exp_avg, exp_avg_sq }).collect()
            };
            // Step 1's moments are shared by both (the kernel copies them); later ones are its own.
            let g = B::adamw_update_many(list(got), scale.clone(), s);
            let w: Vec<_> = list(want).into_iter().map(|t| adamw_update_value(t, scale.clone(), s)).collect();
            assert_eq!(g.len(), sizes.len());
            for (i, (g, w)) in g.iter().zip(&w).enumerate() {
                assert_eq!((g.param.dtype(), g.param.dims()), (dtype, [sizes[i]]));
                if sizes[i] == 0 {
                    // (Burn's wgpu reads an empty tensor as one element.)
                    continue;
                }
                let label = format!("adamw tensor {i} of n={} decay={decay} step={step}", sizes[i]);
                assert_close(&format!("{label} param"), &values(g.param.clone()), &values(w.param.clone()), tolerance);
                assert_close(&format!("{label} exp_avg"), &values(g.exp_avg.clone()), &values(w.exp_avg.clone()), tolerance.max(1e-4));
                assert_close(&format!("{label} exp_avg_sq"), &values(g.exp_avg_sq.clone()), &values(w.exp_avg_sq.clone()), tolerance.max(1e-4));
            }
            got = g.into_iter().map(|u| (u.param, u.exp_avg, u.exp_avg_sq)).collect();
            want = w.into_iter().map(|u| (u.param, u.exp_avg, u.exp_avg_sq)).collect();
        }
    }
}

/// A moment another tensor still holds is not written in place: the other keeps its values.
fn adamw_keeps_shared_moments<B: FusedOptimizerBackend>(device: &B::Device) {
    let t = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), (device, DType::F32));
    let (m, v) = (t(vec![0.5; 9]), t(vec![0.25; 9]));
    let s = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, bias_correction1: 0.1, bias_correction2: 0.001 };
    let tensors = vec![AdamWTensors { param: t(vec![1.0; 9]), grad: t(vec![2.0; 9]), exp_avg: m.clone(), exp_avg_sq: v.clone() }];
    let u = B::adamw_update_many(tensors, t(vec![1.0]), s);
    assert_close("updated exp_avg", &values(u[0].exp_avg.clone()), &[0.65; 9], 1e-6);
    assert_eq!(values(m), [0.5; 9], "the shared exp_avg kept its values");
    assert_eq!(values(v), [0.25; 9], "the shared exp_avg_sq kept its values");
}

/// `B`'s sum of squares (the plain-Burn one on NdArray, the chunk kernel on CubeCL) against the
/// same sum in f64 on the host, an empty gradient among them; and one gradient alone that is empty.
fn sum_of_squares_matches_host<B: FusedOptimizerBackend>(device: &B::Device) {
    let mut rng = Rng(7);
    let sizes: Vec<usize> = SIZES.iter().chain(&[0, 2_000_003]).copied().chain(list_sizes()).collect();
    let host: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.values(n, 1.0)).collect();
    let grads: Vec<Tensor<B, 1>> = host.iter().map(|v| Tensor::from_data(TensorData::new(v.clone(), [v.len()]), (device, DType::F32))).collect();
    for count in [1, 3, 6, grads.len()] {
        let want = host[..count].iter().flatten().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() as f32;
        let got = values(B::sum_of_squares(&grads[..count]));
        // An f32 sum over up to 3.8 M terms against f64: rounding grows with the count.
        assert_close(&format!("sum of squares of {count} tensors"), &got, &[want], 1e-3);
    }
    assert_eq!(values(B::sum_of_squares(&grads[4..5])), [0.0], "an empty gradient alone");
}

/// torch.optim.AdamW's update in f64 on the host: the definition the plain-Burn one follows.
fn adamw_host(p: &[f32], g: &[f32], scale: f32, m: &mut [f64], v: &mut [f64], s: &AdamWStep) -> Vec<f32> {
    p.iter()
        .zip(g)
        .enumerate()
        .map(|(i, (&p, &g))| {
            let g = f64::from(g) * f64::from(scale);
            m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * g;
            v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g * g;
            let p = f64::from(p) * (1.0 - s.lr * s.weight_decay);
            (p - s.lr / s.bias_correction1 * m[i] / (v[i].sqrt() / s.bias_correction2.sqrt() + s.eps)) as f32
        })
        .collect()
}

#[test]
fn ndarray_adamw_matches_torch_formula() {
    let device = Default::default();
    let n = 4_099;
    let mut rng = Rng(11);
    let mut p = rng.values(n, 1.0);
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let t = |x: Vec<f32>| Tensor::<NdArray<f32>, 1>::from_data(TensorData::new(x.clone(), [x.len()]), &device);
    let (mut tp, mut tm, mut tv) = (t(p.clone()), t(vec![0.0; n]), t(vec![0.0; n]));
    for step in 1..=5 {
        let g = rng.values(n, 0.5);
        let s = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            bias_correction1: 1.0 - 0.9f64.powi(step),
            bias_correction2: 1.0 - 0.999f64.powi(step),
        };
        p = adamw_host(&p, &g, 0.5, &mut m, &mut v, &s);
        let list = vec![AdamWTensors { param: tp, grad: t(g), exp_avg: tm, exp_avg_sq: tv }];
        let u = NdArray::<f32>::adamw_update_many(list, t(vec![0.5]), s).pop().unwrap();
        assert_close(&format!("step {step}"), &values(u.param.clone()), &p, 1e-5);
        (tp, tm, tv) = (u.param, u.exp_avg, u.exp_avg_sq);
    }
}

#[test]
fn ndarray_sum_of_squares_matches_host() {
    sum_of_squares_matches_host::<NdArray<f32>>(&Default::default());
}

#[test]
fn wgpu_adamw_matches_definition() {
    adamw_matches_definition::<Wgpu>(&WgpuDevice::default(), DType::F32, 1e-5);
}

#[test]
fn wgpu_adamw_keeps_shared_moments() {
    adamw_keeps_shared_moments::<Wgpu>(&WgpuDevice::default());
}

#[test]
fn wgpu_sum_of_squares_matches_host() {
    sum_of_squares_matches_host::<Wgpu>(&WgpuDevice::default());
}


#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use burn::backend::cuda::CudaDevice;

    type CudaBf16 = burn::backend::Cuda<burn::tensor::bf16, i32>;

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_optimizer_kernels_match_definition() {
        assert_ne!(std::env::var("KERNELS_CUBECL_CUDA_KERNELS").as_deref(), Ok("0"), "KERNELS_CUBECL_CUDA_KERNELS=0 turns the kernels under test off");
        let device = CudaDevice::default();
        adamw_matches_definition::<CudaBf16>(&device, DType::F32, 1e-4);
        // A bf16 parameter: both round the f32 update once per step.
        adamw_matches_definition::<CudaBf16>(&device, DType::BF16, 1e-2);
        adamw_keeps_shared_moments::<CudaBf16>(&device);
        sum_of_squares_matches_host::<CudaBf16>(&device);
    }
}
