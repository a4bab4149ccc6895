//! [`crate::memory_efficient_attention`] on `CubeBackend`: the trait's plain-Burn blockwise
//! implementation, whose matmuls and element-wise ops are CubeCL kernels already. A fused
//! attention kernel would override the trait's methods here.

use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::attention::FusedAttentionBackend;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedAttentionBackend for CubeBackend<R, F, I, BT> {}
