//! The cuBLAS GEMM path (src/backend/cublas.rs) against Burn's f32 matmul, forward and both
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
    let c = trainer::backend::cublas::self_check(&Default::default());
    // bf16 operands are exact in f32; the outputs are rounded once to bf16 (2^-8 relative).
    assert!(c.forward < 1e-2 && c.grad_x < 1e-2 && c.grad_w < 1e-2, "{c:?}");
}
