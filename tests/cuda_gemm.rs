//! The cuBLAS GEMM path (kernels-cubecl's `cube/cublas.rs`) against Burn's f32 matmul, forward and both
//! gradients, on random bf16 operands of odd sizes. GPU-only: built with `--features cuda` and
//! `#[ignore]`d; on the GPU machine:
//!
//!     cargo test --release --features cuda --test cuda_gemm -- --ignored
//!
//! (`trainer bench` runs the same check on CUDA bf16 and reports it as `gemm_check`.)
#![cfg(feature = "cuda")]

#[test]
#[ignore = "needs a CUDA GPU"]
fn cublas_gemm_matches_burn_within_bf16_rounding() {
    let c = trainer::backend::gpu_check::self_check(&Default::default());
    // bf16 operands are exact in f32; the outputs are rounded once to bf16 (2^-8 relative).
    assert!(c.failure().is_none(), "{c:?}");
}

/// `LinearBackend::batched_matmul` (a MoE block's experts: one strided batched cuBLAS GEMM with its
/// own backward) against Burn's matmul on NdArray in f32, from the same bf16-representable
/// values: output, dX and dW, with the operands in bf16 (base weights) and in f32 (LoRA factors).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cublas_batched_gemm_matches_ndarray() {
    use burn::backend::{Autodiff, Cuda, NdArray};
    use burn::tensor::{FloatDType, Tensor, TensorData};
    type G = Autodiff<Cuda<half::bf16, i32>>;
    type C = Autodiff<NdArray<f32>>;
    let (e, m, k, n) = (5, 37, 72, 40);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut values = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                half::bf16::from_f32((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0).to_f32()
            })
            .collect()
    };
    let (x, w, r) = (values(e * m * k), values(e * k * n), values(e * m * n));
    fn run<B: burn::tensor::backend::AutodiffBackend + kernels_cubecl::LinearBackend>(x: &[f32], w: &[f32], r: &[f32], dims: [usize; 4], dtype: FloatDType, device: &B::Device) -> [Vec<f32>; 3] {
        let [e, m, k, n] = dims;
        let t = |v: &[f32], shape: [usize; 3]| Tensor::<B, 3>::from_data(TensorData::new(v.to_vec(), shape), device).cast(dtype);
        let (x, w, r) = (t(x, [e, m, k]).require_grad(), t(w, [e, k, n]).require_grad(), t(r, [e, m, n]));
        let y = <B as kernels_cubecl::LinearBackend>::batched_matmul(x.clone(), w.clone());
        assert_eq!(y.dims(), [e, m, n]);
        let grads = (y.clone().cast(FloatDType::F32) * r.cast(FloatDType::F32)).sum().backward();
        let host = |t: Tensor<B::InnerBackend, 3>| t.cast(FloatDType::F32).into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let (dx, dw) = (x.grad(&grads).expect("dX"), w.grad(&grads).expect("dW"));
        [y.inner(), dx, dw].map(host)
    }
    let want = run::<C>(&x, &w, &r, [e, m, k, n], FloatDType::F32, &Default::default());
    for (dtype, tolerance) in [(FloatDType::BF16, 1e-2), (FloatDType::F32, 1e-5)] {
        let got = run::<G>(&x, &w, &r, [e, m, k, n], dtype, &Default::default());
        for (name, got, want) in [("y", &got[0], &want[0]), ("dX", &got[1], &want[1]), ("dW", &got[2], &want[2])] {
            let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let err = got.iter().zip(want.iter()).fold(0.0f32, |a, (g, w)| a.max((g - w).abs())) / scale;
            assert!(err < tolerance, "{dtype:?} {name}: max relative error {err}");
        }
    }
}
