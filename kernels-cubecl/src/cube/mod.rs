//! CubeCL kernels: implementations of this crate's fused-op traits for burn-cubecl's
//! `CubeBackend` (CUDA, wgpu, ...), behind the `cubecl` feature.

mod attention;
mod layer_kernels;
mod layer_ops;
pub mod gemm;
mod linear_cross_entropy;
mod optimizer;
mod row_kernel;
mod softmax_rows;
