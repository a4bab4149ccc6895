//! The GEMMs of CubeCL backends, per runtime: [`GemmRuntime`] defaults to CubeCL's matmul (what
//! every runtime has; wgpu in CI), CUDA brings cuBLAS (`cublas.rs`). `CubeBackend` takes its
//! [`LinearBackend`] primitives from here (its device memory from `upload.rs`), and this crate's
//! kernels (the fused cross-entropy, the blockwise attention) call the same primitives.

use burn::tensor::{DType, FloatDType, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::kernel::matmul::{matmul, MatmulStrategy};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::linear::LinearBackend;

/// A CubeCL runtime's GEMMs on `CubeTensor`s, with the contracts of [`LinearBackend::gemm`] and
/// [`LinearBackend::gemm_batched`]. The defaults are CubeCL's matmul ([`cubecl_gemm`],
/// [`cubecl_gemm_batched`]).
pub trait GemmRuntime: CubeRuntime {
    fn gemm<F: FloatElement, I: IntElement, BT: BoolElement>(
        a: CubeTensor<Self>,
        ta: bool,
        b: CubeTensor<Self>,
        tb: bool,
        alpha: f64,
        out: DType,
        acc: Option<CubeTensor<Self>>,
    ) -> CubeTensor<Self> {
        cubecl_gemm::<Self, F, I, BT>(a, ta, b, tb, alpha, out, acc)
    }

    fn gemm_batched<F: FloatElement, I: IntElement, BT: BoolElement>(a: CubeTensor<Self>, b: CubeTensor<Self>) -> CubeTensor<Self> {
        cubecl_gemm_batched::<Self, F, I, BT>(a, b)
    }

    /// [`LinearBackend::gemm_grouped`]; the default is its reference, a GEMM a group
    /// ([`cubecl_gemm_grouped`]).
    fn gemm_grouped<F: FloatElement, I: IntElement, BT: BoolElement>(x: CubeTensor<Self>, w: CubeTensor<Self>, counts: &[usize]) -> CubeTensor<Self> {
        cubecl_gemm_grouped::<Self, F, I, BT>(x, w, counts)
    }

    /// [`LinearBackend::gemm_grouped_outer`]; the default is its reference
    /// ([`cubecl_gemm_grouped_outer`]).
    fn gemm_grouped_outer<F: FloatElement, I: IntElement, BT: BoolElement>(x: CubeTensor<Self>, y: CubeTensor<Self>, counts: &[usize]) -> CubeTensor<Self> {
        cubecl_gemm_grouped_outer::<Self, F, I, BT>(x, y, counts)
    }
}

/// The grouped GEMM's reference ([`crate::grouped::reference_gemm_grouped`]) on CubeCL's
/// matmul, a GEMM a group.
pub fn cubecl_gemm_grouped<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(x: CubeTensor<R>, w: CubeTensor<R>, counts: &[usize]) -> CubeTensor<R> {
    crate::grouped::reference_gemm_grouped(float::<R, F, I, BT, 2>(x), float(w), counts).into_primitive().tensor()
}

/// The grouped outer GEMM's reference ([`crate::grouped::reference_gemm_grouped_outer`]) on
/// CubeCL's matmul.
pub fn cubecl_gemm_grouped_outer<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(x: CubeTensor<R>, y: CubeTensor<R>, counts: &[usize]) -> CubeTensor<R> {
    crate::grouped::reference_gemm_grouped_outer(float::<R, F, I, BT, 2>(x), float(y), counts).into_primitive().tensor()
}

#[cfg(feature = "wgpu")]
impl GemmRuntime for cubecl::wgpu::WgpuRuntime {}

fn float<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(t: CubeTensor<R>) -> Tensor<CubeBackend<R, F, I, BT>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `a @ b` with the leading dims as the batch, by CubeCL's matmul on contiguous copies: on CUDA
/// in bf16 it summed wrongly over the attention's strided views (benches/RESULTS.md,
/// 2026-12-01).
pub fn cubecl_gemm_batched<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(a: CubeTensor<R>, b: CubeTensor<R>) -> CubeTensor<R> {
    let dtype = a.dtype;
    matmul(into_contiguous(a), into_contiguous(b), None, MatmulStrategy::default(), dtype).expect("CubeCL matmul launch")
}

/// `alpha op(a) @ op(b)` (+ `acc`) by CubeCL's matmul, from contiguous operands already in the
/// output dtype: on CUDA in bf16 it gave wrong sums for transposed views with an f32 output (the
/// fused cross-entropy's CUDA test, benches/RESULTS.md, 2026-12-01). A scale other than 1 takes
/// the product in f32 and scales it there, then rounds to `out` once.
pub fn cubecl_gemm<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    a: CubeTensor<R>,
    ta: bool,
    b: CubeTensor<R>,
    tb: bool,
    alpha: f64,
    out: DType,
    acc: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    if alpha != 1.0 {
        let y = float::<R, F, I, BT, 2>(cubecl_gemm::<R, F, I, BT>(a, ta, b, tb, 1.0, DType::F32, None)) * alpha;
        let y = crate::layer_ops::to_dtype(y, out);
        return match acc {
            Some(acc) => (float::<R, F, I, BT, 2>(acc) + y).into_primitive().tensor(),
            None => y.into_primitive().tensor(),
        };
    }
    let out_float = match out {
        DType::F32 => Some(FloatDType::F32),
        DType::F16 => Some(FloatDType::F16),
        DType::BF16 => Some(FloatDType::BF16),
        _ => None,
    };
    let op = |t: CubeTensor<R>, transpose: bool| {
        let t = float::<R, F, I, BT, 2>(t);
        let t = if transpose { t.transpose() } else { t };
        let t = match out_float {
            Some(d) => t.cast(d),
            None => t,
        };
        into_contiguous(t.into_primitive().tensor())
    };
    let y = matmul(op(a, ta), op(b, tb), None, MatmulStrategy::default(), out).expect("CubeCL matmul launch");
    match acc {
        Some(acc) => (float::<R, F, I, BT, 2>(acc) + float(y)).into_primitive().tensor(),
        None => y,
    }
}

impl<R: GemmRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LinearBackend for CubeBackend<R, F, I, BT> {
    fn gemm_scaled(a: Tensor<Self, 2>, ta: bool, b: Tensor<Self, 2>, tb: bool, alpha: f64, out: DType, acc: Option<Tensor<Self, 2>>) -> Tensor<Self, 2> {
        let acc = acc.map(|c| c.into_primitive().tensor());
        float(R::gemm::<F, I, BT>(a.into_primitive().tensor(), ta, b.into_primitive().tensor(), tb, alpha, out, acc))
    }

    fn gemm_batched<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        float(R::gemm_batched::<F, I, BT>(a.into_primitive().tensor(), b.into_primitive().tensor()))
    }

    fn gemm_grouped(x: Tensor<Self, 2>, w: Tensor<Self, 3>, counts: &[usize]) -> Tensor<Self, 2> {
        float(R::gemm_grouped::<F, I, BT>(x.into_primitive().tensor(), w.into_primitive().tensor(), counts))
    }

    fn gemm_grouped_outer(x: Tensor<Self, 2>, y: Tensor<Self, 2>, counts: &[usize]) -> Tensor<Self, 3> {
        float(R::gemm_grouped_outer::<F, I, BT>(x.into_primitive().tensor(), y.into_primitive().tensor(), counts))
    }
}
