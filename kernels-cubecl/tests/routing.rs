//! The routed slots' layout (`expert_rows`): the CubeCL kernel (wgpu here: lavapipe on machines
//! without a GPU; CUDA in the ignored test) against the host definition, for odd expert counts,
//! top-k of 1 to 8, experts with no slot, more slots than a cube has units several times over
//! (uneven runs), and choices read through strides.

use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kernels_cubecl::{reference_expert_rows, ExpertRoutingBackend, ExpertRows};

type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;

/// Each token's `top_k` distinct experts, drawn with a skew (low experts more often, the last
/// `idle` never), as routers draw them.
fn choices(tokens: usize, top_k: usize, experts: usize, idle: usize, seed: u64) -> Vec<i64> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33
    };
    let live = experts - idle;
    let mut out = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let mut picked: Vec<i64> = Vec::new();
        while picked.len() < top_k {
            let r = next() as usize;
            // Squared uniform: skewed toward expert 0.
            let u = (r % 1000) as f64 / 1000.0;
            let e = ((u * u) * live as f64) as i64;
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        out.extend(picked);
    }
    out
}

/// `values` (`[rows, cols]`) as a view with a row stride of `cols + 3`: the inputs' strides are
/// honoured (burn-cubecl pads rows on CUDA).
fn strided<B: Backend>(values: &[f32], [rows, cols]: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    let mut wide = vec![0.5f32; rows * (cols + 3)];
    for r in 0..rows {
        wide[r * (cols + 3)..r * (cols + 3) + cols].copy_from_slice(&values[r * cols..(r + 1) * cols]);
    }
    Tensor::<B, 2>::from_data(TensorData::new(wide, [rows, cols + 3]), device).narrow(1, 0, cols)
}

fn ints<B: Backend>(t: Tensor<B, 1, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec().unwrap()
}

fn check<B: ExpertRoutingBackend>(chosen: Tensor<B, 2, Int>, experts: usize, case: &str) {
    let host: Vec<i64> = chosen.clone().into_data().convert::<i64>().to_vec().unwrap();
    let [tokens, top_k] = chosen.dims();
    let want = reference_expert_rows(Tensor::<NdArray, 2, Int>::from_data(TensorData::new(host, [tokens, top_k]), &Default::default()), experts);
    let got: ExpertRows<B> = B::expert_rows(chosen, experts);
    assert_eq!(ints(got.counts), ints(want.counts), "{case}: counts");
    assert_eq!(ints(got.slot_row), ints(want.slot_row), "{case}: slot_row");
    assert_eq!(ints(got.row_slot), ints(want.row_slot), "{case}: row_slot");
    assert_eq!(ints(got.row_token), ints(want.row_token), "{case}: row_token");
}

fn cases<B: ExpertRoutingBackend>(device: &B::Device) {
    for (tokens, top_k, experts, idle) in [(1, 1, 1, 0), (5, 2, 3, 0), (37, 2, 7, 2), (300, 8, 13, 4), (1031, 8, 128, 9), (2049, 1, 5, 1), (4096, 4, 60, 0)] {
        for seed in [1, 2] {
            let values = choices(tokens, top_k, experts, idle, seed);
            let case = format!("{tokens} tokens, top {top_k} of {experts} experts ({idle} idle), seed {seed}");
            let chosen = Tensor::<B, 2, Int>::from_data(TensorData::new(values.clone(), [tokens, top_k]), device);
            check(chosen, experts, &case);
            // The same choices read through strides: the transpose of a [top_k, tokens] tensor.
            let mut transposed = vec![0i64; values.len()];
            for t in 0..tokens {
                for j in 0..top_k {
                    transposed[j * tokens + t] = values[t * top_k + j];
                }
            }
            let strided = Tensor::<B, 2, Int>::from_data(TensorData::new(transposed, [top_k, tokens]), device).transpose();
            check(strided, experts, &format!("{case}, strided"));
        }
    }
}

#[test]
fn wgpu_expert_rows_match_the_host_layout() {
    cases::<Wgpu>(&WgpuDevice::default());
}

/// The row gather (the dispatch) against Burn's `select`: widths with and without a vector
/// width dividing them, repeated and unordered indices.
#[test]
fn wgpu_gather_rows_is_select() {
    let device = WgpuDevice::default();
    for (n, hidden, m) in [(5, 37, 11), (9, 64, 40), (300, 2048, 777)] {
        let values: Vec<f32> = (0..n * hidden).map(|i| (i % 1013) as f32 * 0.5 - 7.0).collect();
        let index: Vec<i64> = choices(m, 1, n, 0, 3);
        let src = strided::<Wgpu>(&values, [n, hidden], &device);
        let idx = Tensor::<Wgpu, 1, Int>::from_data(TensorData::new(index, [m]), &device);
        let got: Vec<f32> = Wgpu::gather_rows(src.clone(), idx.clone()).into_data().to_vec().unwrap();
        let want: Vec<f32> = src.select(0, idx).into_data().to_vec().unwrap();
        assert_eq!(got, want, "{n} rows of {hidden}, {m} gathered");
    }
}

#[test]
fn host_layout_on_ndarray_is_its_own_reference() {
    cases::<NdArray>(&Default::default());
}

#[cfg(feature = "cuda")]
mod cuda {
    use burn::backend::cuda::{Cuda, CudaDevice};

    /// On the GPU machine: `cargo test --release --features cuda -p kernels-cubecl --test routing -- --ignored`.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_expert_rows_match_the_host_layout() {
        super::cases::<Cuda<burn::tensor::bf16, i32>>(&CudaDevice::default());
        // Qwen3-30B-A3B's shape: 8192 tokens, top 8 of 128.
        let values = super::choices(8192, 8, 128, 3, 7);
        let chosen = burn::tensor::Tensor::<Cuda<burn::tensor::bf16, i32>, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(values, [8192, 8]), &CudaDevice::default());
        super::check(chosen, 128, "8192 tokens, top 8 of 128");
    }
}

mod combine {
    use super::*;
    use burn::backend::Autodiff;
    use burn::tensor::backend::AutodiffBackend;

    fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let err = got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(err <= tol * scale, "{what}: max error {err} against scale {scale}");
    }

    /// The fused combine and its gradients, forward and backward, against the plain definitions
    /// on the same backend, and under autodiff against the gather-multiply-sum it replaces on
    /// NdArray.
    fn combine_cases<B: ExpertRoutingBackend + AutodiffBackend>(device: &B::Device, tol: f32)
    where
        B::InnerBackend: ExpertRoutingBackend,
    {
        type Plain = Autodiff<NdArray>;
        for (tokens, top_k, experts, hidden) in [(3, 1, 2, 5), (37, 2, 7, 37), (300, 8, 13, 300), (64, 4, 9, 1000)] {
            let case = format!("{tokens} tokens, top {top_k} of {experts}, hidden {hidden}");
            let values = choices(tokens, top_k, experts, 1.min(experts - top_k), 5);
            let slots = tokens * top_k;
            let host = |shape: [usize; 2], seed: u64| -> Vec<f32> {
                let n = shape[0] * shape[1];
                // Uniform in [-1, 1) from the choices' generator: 1000 levels are plenty here.
                choices(n, 1, 1000, 0, seed).into_iter().map(|v| v as f32 / 500.0 - 1.0).collect()
            };
            let (ys_v, w_v, dy_v) = (host([slots, hidden], 1), host([slots, 1], 2), host([tokens, hidden], 3));
            let make = |v: &[f32], shape: [usize; 2], d: &B::Device| Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), shape), d);

            // Inner backend: kernel against the definition.
            type Inner<B> = <B as AutodiffBackend>::InnerBackend;
            let chosen = Tensor::<Inner<B>, 2, Int>::from_data(TensorData::new(values.clone(), [tokens, top_k]), device);
            let rows = Inner::<B>::expert_rows(chosen, experts);
            let ys = strided::<Inner<B>>(&ys_v, [slots, hidden], device);
            let w = make(&w_v, [slots, 1], device).inner().reshape([slots]);
            let dy = strided::<Inner<B>>(&dy_v, [tokens, hidden], device);
            let got = Inner::<B>::combine_rows(ys.clone(), w.clone(), &rows, top_k);
            let want = kernels_cubecl::routing::reference_combine(ys.clone(), w.clone(), &rows, top_k);
            close(&floats(got), &floats(want), tol, &format!("{case}: forward"));
            let (g_ys, g_w) = Inner::<B>::combine_rows_grad(dy.clone(), Some(ys.clone()), w.clone(), &rows, top_k);
            let (r_ys, r_w) = kernels_cubecl::routing::reference_combine_grad(dy.clone(), Some(ys.clone()), w.clone(), &rows, top_k);
            close(&floats(g_ys), &floats(r_ys.clone()), tol, &format!("{case}: d ys"));
            close(&floats(g_w.expect("asked")), &floats(r_w.expect("asked")), tol, &format!("{case}: d weights"));
            let (g_ys, g_w) = Inner::<B>::combine_rows_grad(dy, None, w, &rows, top_k);
            assert!(g_w.is_none());
            close(&floats(g_ys), &floats(r_ys), tol, &format!("{case}: d ys without d weights"));

            // Autodiff: the op against gather, multiply and sum on NdArray.
            let chosen = Tensor::<B, 2, Int>::from_data(TensorData::new(values.clone(), [tokens, top_k]), device);
            let rows = B::expert_rows(chosen, experts);
            let ys = make(&ys_v, [slots, hidden], device).require_grad();
            let w = make(&w_v, [slots, 1], device).reshape([slots]).require_grad();
            let grads = (B::combine_rows(ys.clone(), w.clone(), &rows, top_k) * make(&dy_v, [tokens, hidden], device)).sum().backward();
            let (d_ys, d_w) = (ys.grad(&grads).expect("ys"), w.grad(&grads).expect("weights"));

            let pd = Default::default();
            let p_rows = <Plain as ExpertRoutingBackend>::expert_rows(Tensor::from_data(TensorData::new(values, [tokens, top_k]), &pd), experts);
            let p_ys = Tensor::<Plain, 2>::from_data(TensorData::new(ys_v, [slots, hidden]), &pd).require_grad();
            let p_w = Tensor::<Plain, 2>::from_data(TensorData::new(w_v, [slots, 1]), &pd).reshape([slots]).require_grad();
            let picked = p_ys.clone().select(0, p_rows.slot_row.clone()) * p_w.clone().reshape([slots, 1]);
            let out = picked.reshape([tokens, top_k, hidden]).sum_dim(1).reshape([tokens, hidden]);
            let p_grads = (out * Tensor::<Plain, 2>::from_data(TensorData::new(dy_v, [tokens, hidden]), &pd)).sum().backward();
            close(&floats(d_ys), &floats(p_ys.grad(&p_grads).unwrap()), tol, &format!("{case}: autodiff d ys"));
            close(&floats(d_w), &floats(p_w.grad(&p_grads).unwrap()), tol, &format!("{case}: autodiff d weights"));
        }
    }

    #[test]
    fn wgpu_combine_matches_the_definition_and_autodiff() {
        combine_cases::<Autodiff<Wgpu>>(&WgpuDevice::default(), 1e-5);
    }

    #[test]
    fn ndarray_combine_matches_autodiff() {
        combine_cases::<Autodiff<NdArray>>(&Default::default(), 1e-5);
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_combine_matches_the_definition_and_autodiff() {
        use burn::backend::cuda::{Cuda, CudaDevice};
        combine_cases::<Autodiff<Cuda<f32, i32>>>(&CudaDevice::default(), 1e-5);
        combine_cases::<Autodiff<Cuda<burn::tensor::bf16, i32>>>(&CudaDevice::default(), 2e-2);
    }
}
