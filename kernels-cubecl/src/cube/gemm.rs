//! The GEMMs of this crate's CubeCL kernels, with a slot for a faster one.
//!
//! CubeCL's own matmul is what every runtime has (wgpu in CI). On CUDA, trainer registers a
//! cuBLAS GEMM ([`set_gemm`]) working on the same `CubeTensor` memory: it is ~3.5x faster in
//! bf16 on an H200 (shared/PLATFORM.md) and takes transposed operands without a copy. The slot
//! is type-erased because this crate does not name the CUDA runtime; a registered GEMM returns
//! `None` for tensors it does not handle (another runtime, f32), and CubeCL's matmul runs.

use std::any::Any;
use std::sync::OnceLock;

use burn::tensor::{DType, FloatDType, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::kernel::matmul::{matmul, MatmulStrategy};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

/// `op(a) @ op(b)` of 2-D `CubeTensor`s (`op` transposes when its flag is set), with output
/// dtype `out`, added in place to `acc` (same dtype `out`, returned) when given; `None` when the
/// operands are not ones it handles.
pub type GemmFn = fn(a: &dyn Any, ta: bool, b: &dyn Any, tb: bool, out: DType, acc: Option<&dyn Any>) -> Option<Box<dyn Any>>;

/// `a @ b` of 4-D `CubeTensor`s `[b1, b2, m, k]` x `[b1, b2, k, n]` (views allowed: strides say
/// whether a matrix is read transposed), output in the operands' dtype; `None` when it does not
/// handle them.
pub type BatchedGemmFn = fn(a: &dyn Any, b: &dyn Any) -> Option<Box<dyn Any>>;

static GEMM: OnceLock<GemmFn> = OnceLock::new();
static BATCHED: OnceLock<BatchedGemmFn> = OnceLock::new();

/// Use `gemm` for the batched matmuls of this crate's kernels (the blockwise attention's) where
/// it handles the operands. The first registration wins; returns whether this one did.
pub fn set_batched_gemm(gemm: BatchedGemmFn) -> bool {
    BATCHED.set(gemm).is_ok()
}

/// `a @ b` of 4-D tensors through the registered batched GEMM, else Burn's (CubeCL's) matmul.
pub(crate) fn batched_matmul<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    a: Tensor<CubeBackend<R, F, I, BT>, 4>,
    b: Tensor<CubeBackend<R, F, I, BT>, 4>,
) -> Tensor<CubeBackend<R, F, I, BT>, 4> {
    if let Some(f) = BATCHED.get() {
        let (pa, pb) = (a.clone().into_primitive().tensor(), b.clone().into_primitive().tensor());
        if let Some(y) = f(&pa, &pb) {
            if let Ok(y) = y.downcast::<CubeTensor<R>>() {
                return Tensor::from_primitive(TensorPrimitive::Float(*y));
            }
        }
    }
    // CubeCL's matmul on contiguous copies: on CUDA in bf16 it summed wrongly over the
    // attention's strided views (benches/RESULTS.md, 2026-12-01).
    let contiguous = |t: Tensor<CubeBackend<R, F, I, BT>, 4>| Tensor::from_primitive(TensorPrimitive::Float(into_contiguous(t.into_primitive().tensor())));
    contiguous(a).matmul(contiguous(b))
}

/// Use `gemm` for this crate's kernels' matmuls where it handles the operands. The first
/// registration wins; returns whether this one did.
pub fn set_gemm(gemm: GemmFn) -> bool {
    GEMM.set(gemm).is_ok()
}

/// `op(a) @ op(b)` (+ `acc`) through the registered GEMM, else CubeCL's matmul.
pub(crate) fn gemm<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    a: CubeTensor<R>,
    ta: bool,
    b: CubeTensor<R>,
    tb: bool,
    out: DType,
    acc: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    if let Some(f) = GEMM.get() {
        if let Some(y) = f(&a, ta, &b, tb, out, acc.as_ref().map(|c| c as &dyn Any)) {
            if let Ok(y) = y.downcast::<CubeTensor<R>>() {
                return *y;
            }
        }
    }
    let float = |t: CubeTensor<R>| Tensor::<CubeBackend<R, F, I, BT>, 2>::from_primitive(TensorPrimitive::Float(t));
    // CubeCL's matmul from contiguous operands already in the output dtype: on CUDA in bf16 it
    // gave wrong sums for transposed views with an f32 output (the fused cross-entropy's CUDA test,
    // benches/RESULTS.md, 2026-12-01).
    let out_float = match out {
        DType::F32 => Some(FloatDType::F32),
        DType::F16 => Some(FloatDType::F16),
        DType::BF16 => Some(FloatDType::BF16),
        _ => None,
    };
    let op = |t: CubeTensor<R>, transpose: bool| {
        let t = if transpose { float(t).transpose() } else { float(t) };
        let t = match out_float {
            Some(d) => t.cast(d),
            None => t,
        };
        into_contiguous(t.into_primitive().tensor())
    };
    let y = matmul(op(a, ta), op(b, tb), None, MatmulStrategy::default(), out).expect("matmul launch");
    match acc {
        Some(acc) => (float(acc) + float(y)).into_primitive().tensor(),
        None => y,
    }
}
