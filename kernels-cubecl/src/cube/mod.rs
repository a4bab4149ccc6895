//! CubeCL kernels: implementations of this crate's fused-op traits for burn-cubecl's
//! `CubeBackend` (CUDA, wgpu, ...), behind the `cubecl` feature.

mod attention;
#[cfg(feature = "cuda")]
mod compute_stream;
#[cfg(feature = "cuda")]
pub mod cublas;
#[cfg(feature = "cuda")]
mod cublas_grouped;
mod flash;
mod flash_copy;
mod flash_kernel;
mod flash_mma;
pub mod gemm;
mod layer_kernels;
mod layer_ops;
mod linear_cross_entropy;
mod norm_rows;
mod multi_tensor;
#[cfg(feature = "cuda")]
pub mod nccl;
mod optimizer;
mod row_kernel;
mod routing;
mod routing_kernel;
mod softmax_rows;
mod upload;

pub use upload::UploadRuntime;

/// Whether the environment variable `name` is set to `value`.
pub(crate) fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == value)
}

/// Whether this crate's layer, norm, attention-softmax and optimizer kernels run on
/// `client`'s runtime: everywhere, unless `KERNELS_CUBECL_CUDA_KERNELS=0` turns them off on CUDA
/// (then CUDA runs the plain-Burn definitions inside the same single autodiff ops, to compare).
/// On CUDA (cubecl-cuda 0.10) burn-cubecl lays out new tensors with padded rows: every kernel
/// here reads its inputs through their strides and writes outputs it allocates contiguous
/// (`empty_device_contiguous_dtype`), which is what made them wrong there until 2026-12-02
/// (`tests/launch_patterns.rs`).
pub(crate) fn kernels_on<R: cubecl::Runtime>(client: &cubecl::prelude::ComputeClient<R>) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    R::name(client) != "cuda" || !*OFF.get_or_init(|| env_is("KERNELS_CUBECL_CUDA_KERNELS", "0"))
}

use burn::tensor::{DType, FloatDType, Tensor, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

/// The CubeCL tensor under a float tensor of a `CubeBackend`.
pub(crate) fn cube_tensor<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    tensor: Tensor<CubeBackend<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    tensor.into_primitive().tensor()
}

/// A CubeCL tensor as a float tensor of a `CubeBackend`.
pub(crate) fn float<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    tensor: CubeTensor<R>,
) -> Tensor<CubeBackend<R, F, I, BT>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(tensor))
}

/// `t` in f32 (a cast only if not f32 already), as the CubeCL tensor the kernels read.
pub(crate) fn f32_tensor<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: Tensor<CubeBackend<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    cube_tensor(if t.dtype() == DType::F32 { t } else { t.cast(FloatDType::F32) })
}
