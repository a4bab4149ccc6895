//! [`crate::layer_ops`] on `CubeBackend`: RMSNorm, SwiGLU and the rotary embedding as one
//! kernel forward and one backward each ([`super::layer_kernels`], [`super::norm_rows`]) instead
//! of Burn's chains of element-wise passes, where [`super::kernels_on`] says they run (everywhere
//! by default). RMSNorm's weight gradient (unused by LoRA, whose norms are frozen) stays the
//! plain-Burn column sum.

use burn::tensor::{DType, Shape, Tensor, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::{CubeCount, CubeDim};
use cubecl::calculate_cube_count_elemwise;

use super::{cube_tensor, f32_tensor, float};
use super::layer_kernels::{rotary_vectors, swiglu_grad_vectors, swiglu_vectors};
use super::norm_rows::{rms_norm_grad_rows, rms_norm_rows};
use super::row_kernel::{row_cubes, row_units};
use crate::layer_ops::{rms_norm_grad, rms_norm_parts, rotary_grad, rotary_value, swiglu_grad, swiglu_value, FusedLayerBackend, NormWanted};

/// Units per cube of the RMSNorm row kernels at most (a power of two).
const NORM_UNITS: u32 = 256;

/// A fresh contiguous tensor of `shape` in `dtype` beside `like`.
fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// Whether the kernels run for `t`'s runtime ([`super::kernels_on`]).
fn on<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(t: &Tensor<CubeBackend<R, F, I, BT>, D>) -> bool {
    super::kernels_on(&t.clone().into_primitive().tensor().client)
}

/// The widest vector (elements) in which the vector kernels can read every one of `tensors`
/// (each with a unit last stride): at most the runtime's widest load for each dtype, dividing
/// `divides`, with the other strides and the byte offsets multiples of it; 1 at the least.
fn vector_width<R: CubeRuntime>(tensors: &[&CubeTensor<R>], divides: usize) -> usize {
    let fits = |t: &CubeTensor<R>, n: usize| {
        let strides = t.meta.strides();
        let offset = t.handle.offset_start.unwrap_or(0);
        strides[..strides.len() - 1].iter().all(|s| s % n == 0) && offset % (n * t.dtype.size()) as u64 == 0
    };
    let widest = |t: &&CubeTensor<R>| t.client.io_optimized_vector_sizes(t.dtype.size()).max().unwrap_or(1);
    let mut n = tensors.iter().map(widest).min().unwrap_or(1);
    while n > 1 && !(divides % n == 0 && tensors.iter().all(|t| fits(t, n))) {
        n /= 2;
    }
    n
}

/// `t` itself if its last stride is 1 (what the vector kernels read), else a contiguous copy.
fn unit_last_stride<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    if t.meta.strides().last() == Some(&1) { t } else { into_contiguous(t) }
}

/// Grid and cube for one unit per element.
fn elementwise<R: CubeRuntime>(like: &CubeTensor<R>, elements: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&like.client, elements);
    (calculate_cube_count_elemwise(&like.client, elements, dim), dim)
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedLayerBackend for CubeBackend<R, F, I, BT> {
    fn rms_norm_forward(x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        let [rows, n] = x.dims();
        assert_eq!(weight.dims(), [n], "rms_norm: weight does not fit the rows");
        if rows * n == 0 || !on(&x) {
            return rms_norm_parts(x, weight, eps);
        }
        let (x, weight) = (cube_tensor(x), f32_tensor(weight));
        let out = empty_like(&x, x.shape(), x.dtype);
        let rstd = empty_like(&x, Shape::new([rows]), DType::F32);
        let units = row_units(n, NORM_UNITS);
        let dtype = x.dtype.into();
        rms_norm_rows::launch::<R>(
            &x.client.clone(),
            row_cubes(rows),
            CubeDim::new_1d(units),
            x.into_tensor_arg(),
            weight.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            eps as f32,
            n as f32,
            units,
            dtype,
        );
        (float(out), float(rstd))
    }

    fn rms_norm_backward(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        rstd: Tensor<Self, 1>,
        grad: Tensor<Self, 2>,
        wanted: NormWanted,
    ) -> (Option<Tensor<Self, 2>>, Option<Tensor<Self, 1>>) {
        let [rows, n] = x.dims();
        if rows * n == 0 || !wanted.x || !on(&x) {
            return rms_norm_grad(x, weight, rstd, grad, wanted);
        }
        let only_weight = NormWanted { x: false, weight: true };
        let grad_w = if wanted.weight { rms_norm_grad(x.clone(), weight.clone(), rstd.clone(), grad.clone(), only_weight).1 } else { None };
        let x = cube_tensor(x);
        let grad = cube_tensor(float::<R, F, I, BT, 2>(cube_tensor(grad)).cast(x.dtype));
        let (weight, rstd) = (f32_tensor(weight), f32_tensor(rstd));
        let dx = empty_like(&x, x.shape(), x.dtype);
        let units = row_units(n, NORM_UNITS);
        let dtype = x.dtype.into();
        rms_norm_grad_rows::launch::<R>(
            &x.client.clone(),
            row_cubes(rows),
            CubeDim::new_1d(units),
            x.into_tensor_arg(),
            weight.into_tensor_arg(),
            rstd.into_tensor_arg(),
            grad.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            n as f32,
            rows as u32,
            units,
            dtype,
        );
        (Some(float(dx)), grad_w)
    }

    fn swiglu_forward(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let dims = gate.dims();
        assert_eq!(dims, up.dims(), "swiglu: gate and up differ in shape");
        let elements = dims.iter().product::<usize>();
        if elements == 0 || !on(&gate) {
            return swiglu_value(gate, up);
        }
        // One dtype for the kernel: gate's. A last dimension that is not unit-stride is copied.
        let gate = unit_last_stride(cube_tensor(gate));
        let up = unit_last_stride(cube_tensor(float::<R, F, I, BT, 3>(cube_tensor(up)).cast(gate.dtype)));
        let out = empty_like(&gate, gate.shape(), gate.dtype);
        let n = vector_width(&[&gate, &up], dims[2]);
        let (count, dim) = elementwise(&gate, elements / n);
        let (dtype, client) = (gate.dtype.into(), gate.client.clone());
        swiglu_vectors::launch::<R>(&client, count, dim, n, gate.into_tensor_arg(), up.into_tensor_arg(), out.clone().into_tensor_arg(), dtype);
        float(out)
    }

    fn swiglu_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        grad: Tensor<Self, 3>,
        wanted: [bool; 2],
    ) -> (Option<Tensor<Self, 3>>, Option<Tensor<Self, 3>>) {
        let dims = gate.dims();
        let elements = dims.iter().product::<usize>();
        if elements == 0 || !(wanted[0] || wanted[1]) || !on(&gate) {
            return swiglu_grad(gate, up, grad, wanted);
        }
        let (g_dtype, u_dtype) = (gate.dtype(), up.dtype());
        let gate = unit_last_stride(cube_tensor(gate));
        let cast = |t: Tensor<Self, 3>| unit_last_stride(cube_tensor(float::<R, F, I, BT, 3>(cube_tensor(t)).cast(gate.dtype)));
        let (up, grad) = (cast(up), cast(grad));
        // An output the kernel does not write still takes an argument: one element.
        let output = |want: bool| empty_like(&gate, if want { gate.shape() } else { Shape::new([1]) }, gate.dtype);
        let (d_gate, d_up) = (output(wanted[0]), output(wanted[1]));
        let n = vector_width(&[&gate, &up, &grad], dims[2]);
        let (count, dim) = elementwise(&gate, elements / n);
        let (dtype, client) = (gate.dtype.into(), gate.client.clone());
        let (g, u, dy) = (gate.into_tensor_arg(), up.into_tensor_arg(), grad.into_tensor_arg());
        let (dg, du) = (d_gate.clone().into_tensor_arg(), d_up.clone().into_tensor_arg());
        swiglu_grad_vectors::launch::<R>(&client, count, dim, n, g, u, dy, dg, du, wanted[0], wanted[1], dtype);
        let back = |t: CubeTensor<R>, dtype: DType| {
            let t = float::<R, F, I, BT, 3>(t);
            if t.dtype() == dtype { t } else { t.cast(dtype) }
        };
        (wanted[0].then(|| back(d_gate, g_dtype)), wanted[1].then(|| back(d_up, u_dtype)))
    }

    fn rotary_forward(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        rotary::<R, F, I, BT>(x, cos, sin, false)
    }

    fn rotary_backward(grad: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        rotary::<R, F, I, BT>(grad, cos, sin, true)
    }
}

fn rotary<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<CubeBackend<R, F, I, BT>, 4>,
    cos: Tensor<CubeBackend<R, F, I, BT>, 4>,
    sin: Tensor<CubeBackend<R, F, I, BT>, 4>,
    backward: bool,
) -> Tensor<CubeBackend<R, F, I, BT>, 4> {
    let [b, h, s, d] = x.dims();
    let [tb, _, ts, td] = cos.dims();
    assert!(d % 2 == 0 && ts == s && td == d && (tb == b || tb == 1), "rotary: tables {:?} do not fit x {:?}", cos.dims(), x.dims());
    let elements = b * h * s * d;
    if elements == 0 || !on(&x) {
        return if backward { rotary_grad(x, cos, sin) } else { rotary_value(x, cos, sin) };
    }
    // Heads and positions may come swapped (the model's layout); a last dimension that is not
    // unit-stride (never in the model) is copied first.
    let x = unit_last_stride(cube_tensor(x));
    let (cos, sin) = (unit_last_stride(f32_tensor(cos)), unit_last_stride(f32_tensor(sin)));
    let out = empty_like(&x, x.shape(), x.dtype);
    let n = vector_width(&[&x, &cos, &sin], d / 2);
    let (count, dim) = elementwise(&x, elements / n);
    let dtype = x.dtype.into();
    let client = x.client.clone();
    let (xa, c, s, o) = (x.into_tensor_arg(), cos.into_tensor_arg(), sin.into_tensor_arg(), out.clone().into_tensor_arg());
    rotary_vectors::launch::<R>(&client, count, dim, n, xa, c, s, o, backward, dtype);
    float(out)
}
