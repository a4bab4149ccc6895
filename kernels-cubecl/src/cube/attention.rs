//! [`crate::memory_efficient_attention`] on `CubeBackend`: the trait's plain-Burn blockwise
//! implementation, whose element-wise ops are CubeCL kernels and whose batched matmuls go
//! through a registered GEMM (cuBLAS on CUDA) where there is one. A fused attention kernel would
//! override the trait's other methods here.

use burn::tensor::Tensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::attention::FusedAttentionBackend;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedAttentionBackend for CubeBackend<R, F, I, BT> {
    fn attention_matmul(a: Tensor<Self, 4>, b: Tensor<Self, 4>) -> Tensor<Self, 4> {
        super::gemm::batched_matmul(a, b)
    }
}
