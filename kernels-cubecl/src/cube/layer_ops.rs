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
use super::layer_kernels::{rotary_vectors, swiglu_grad_vectors, swiglu_packed_grad_vectors, swiglu_packed_vectors, swiglu_vectors};
use super::norm_rows::{add_rms_norm_rows, rms_norm_grad_rows, rms_norm_rows};
use super::row_kernel::{row_cubes, row_units};
use crate::qkv::{qkv_rotary_grad, qkv_rotary_value, QkvLayout};
use crate::gate_up::{swiglu_packed_grad, swiglu_packed_value};
use crate::residual_norm::add_rms_norm_parts;
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

    fn add_rms_norm_forward(x: Tensor<Self, 2>, delta: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 1>) {
        let [rows, n] = x.dims();
        assert_eq!(delta.dims(), [rows, n], "add_rms_norm: the residual and what is added to it differ in shape");
        assert_eq!(weight.dims(), [n], "add_rms_norm: weight does not fit the rows");
        if rows * n == 0 || !on(&x) || x.dtype() != delta.dtype() {
            return add_rms_norm_parts(x, delta, weight, eps);
        }
        let (x, delta, weight) = (cube_tensor(x), cube_tensor(delta), f32_tensor(weight));
        let sum = empty_like(&x, x.shape(), x.dtype);
        let out = empty_like(&x, x.shape(), x.dtype);
        let rstd = empty_like(&x, Shape::new([rows]), DType::F32);
        let units = row_units(n, NORM_UNITS);
        let dtype = x.dtype.into();
        add_rms_norm_rows::launch::<R>(
            &x.client.clone(),
            row_cubes(rows),
            CubeDim::new_1d(units),
            x.into_tensor_arg(),
            delta.into_tensor_arg(),
            weight.into_tensor_arg(),
            sum.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            eps as f32,
            n as f32,
            units,
            dtype,
        );
        (float(sum), float(out), float(rstd))
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

    fn swiglu_packed_forward(packed: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let [a, b, width] = packed.dims();
        let c = width / 2;
        if a * b * c == 0 || width % 2 != 0 || !on(&packed) {
            return swiglu_packed_value(packed);
        }
        let packed = into_contiguous(cube_tensor(packed));
        let out = empty_like(&packed, Shape::new([a, b, c]), packed.dtype);
        let n = vector_width(&[&packed], c);
        let (count, dim) = elementwise(&packed, a * b * c / n);
        let (dtype, client) = (packed.dtype.into(), packed.client.clone());
        swiglu_packed_vectors::launch::<R>(&client, count, dim, n, packed.into_tensor_arg(), out.clone().into_tensor_arg(), dtype);
        float(out)
    }

    fn swiglu_packed_backward(packed: Tensor<Self, 3>, grad: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let [a, b, width] = packed.dims();
        let c = width / 2;
        if a * b * c == 0 || width % 2 != 0 || !on(&packed) {
            return swiglu_packed_grad(packed, grad);
        }
        let packed = into_contiguous(cube_tensor(packed));
        let grad = into_contiguous(cube_tensor(float::<R, F, I, BT, 3>(cube_tensor(grad)).cast(packed.dtype)));
        let d_packed = empty_like(&packed, packed.shape(), packed.dtype);
        let n = vector_width(&[&packed, &grad], c);
        let (count, dim) = elementwise(&packed, a * b * c / n);
        let (dtype, client) = (packed.dtype.into(), packed.client.clone());
        let args = (packed.into_tensor_arg(), grad.into_tensor_arg(), d_packed.clone().into_tensor_arg());
        swiglu_packed_grad_vectors::launch::<R>(&client, count, dim, n, args.0, args.1, args.2, dtype);
        float(d_packed)
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

    /// One launch per part: q and k rotated, v copied, each from its heads of the projection
    /// into its contiguous part of the packed tensor.
    fn qkv_rotary_forward(projected: Tensor<Self, 3>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>, layout: QkvLayout) -> Tensor<Self, 1> {
        if layout.is_empty() || !on(&projected) {
            return qkv_rotary_value(projected, cos, sin, layout);
        }
        let QkvLayout { batch, seq, head_dim, .. } = layout;
        assert_eq!(projected.dims(), [batch, seq, layout.heads() * head_dim], "qkv rotary: the projection does not fit the layout");
        let like = cube_tensor(projected.clone());
        let packed = empty_like(&like, Shape::new([layout.len()]), like.dtype);
        let heads = projected.reshape([batch, seq, layout.heads(), head_dim]);
        for part in layout.parts() {
            let x = heads.clone().narrow(2, part.first_head, part.heads).swap_dims(1, 2);
            let strides = [part.heads * seq * head_dim, seq * head_dim, head_dim, 1];
            let out = OutView { base: packed.clone(), offset: part.offset, strides };
            rotary_into(x, cos.clone(), sin.clone(), out, false, part.rotated);
        }
        float(packed)
    }

    /// One launch per part, each from its contiguous part of the packed gradient into its heads of
    /// the projection's (token-major) gradient.
    fn qkv_rotary_backward(grad: Tensor<Self, 1>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>, layout: QkvLayout) -> Tensor<Self, 3> {
        if layout.is_empty() || !on(&grad) {
            return qkv_rotary_grad(grad, cos, sin, layout);
        }
        let QkvLayout { batch, seq, head_dim, .. } = layout;
        let like = cube_tensor(grad.clone());
        let shape = Shape::new([batch, seq, layout.heads(), head_dim]);
        let dx = empty_like(&like, shape, like.dtype);
        let heads = layout.heads();
        for part in layout.parts() {
            let strides = [seq * heads * head_dim, head_dim, heads * head_dim, 1];
            let out = OutView { base: dx.clone(), offset: part.first_head * head_dim, strides };
            rotary_into(layout.view(grad.clone(), part), cos.clone(), sin.clone(), out, true, part.rotated);
        }
        float::<R, F, I, BT, 4>(dx).reshape([batch, seq, heads * head_dim])
    }
}

fn rotary<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<CubeBackend<R, F, I, BT>, 4>,
    cos: Tensor<CubeBackend<R, F, I, BT>, 4>,
    sin: Tensor<CubeBackend<R, F, I, BT>, 4>,
    backward: bool,
) -> Tensor<CubeBackend<R, F, I, BT>, 4> {
    let dims = x.dims();
    if dims.iter().product::<usize>() == 0 || !on(&x) {
        return if backward { rotary_grad(x, cos, sin) } else { rotary_value(x, cos, sin) };
    }
    let like = cube_tensor(x.clone());
    let out = empty_like(&like, like.shape(), like.dtype);
    let [_, h, s, d] = dims;
    rotary_into(x, cos, sin, OutView { base: out.clone(), offset: 0, strides: [h * s * d, s * d, d, 1] }, backward, true);
    float(out)
}

/// Where [`rotary_vectors`] writes: `[batch, heads, seq, d]` with `strides`, from element
/// `offset` of `base`'s buffer. The kernel takes the offset itself: Burn's `narrow` copies a view
/// whose byte offset is not a multiple of the runtime's alignment, and a kernel writing into that
/// copy would leave `base` unwritten.
struct OutView<R: CubeRuntime> {
    base: CubeTensor<R>,
    offset: usize,
    strides: [usize; 4],
}

/// Launches [`rotary_vectors`] from `x` into `out` (`x` any strides).
fn rotary_into<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<CubeBackend<R, F, I, BT>, 4>,
    cos: Tensor<CubeBackend<R, F, I, BT>, 4>,
    sin: Tensor<CubeBackend<R, F, I, BT>, 4>,
    out: OutView<R>,
    backward: bool,
    rotate: bool,
) {
    let [b, h, s, d] = x.dims();
    let [tb, _, ts, td] = cos.dims();
    assert!(d % 2 == 0 && ts == s && td == d && (tb == b || tb == 1), "rotary: tables {:?} do not fit x {:?}", cos.dims(), x.dims());
    assert!(out.strides[3] == 1 && out.base.handle.offset_start.unwrap_or(0) == 0, "rotary: the output view must start a buffer and have a unit last stride");
    // Heads and positions may come swapped (the model's layout); a last dimension that is not
    // unit-stride (never in the model) is copied first.
    let x = unit_last_stride(cube_tensor(x));
    let mut view = out.base;
    *view.meta = cubecl::zspace::metadata::Metadata::new([b, h, s, d], out.strides);
    let (cos, sin) = (unit_last_stride(f32_tensor(cos)), unit_last_stride(f32_tensor(sin)));
    let mut n = vector_width(&[&x, &view, &cos, &sin], d / 2);
    while out.offset % n != 0 {
        n /= 2;
    }
    let (count, dim) = elementwise(&x, b * h * s * d / n);
    let dtype = x.dtype.into();
    let client = x.client.clone();
    let (xa, c, s, o) = (x.into_tensor_arg(), cos.into_tensor_arg(), sin.into_tensor_arg(), view.into_tensor_arg());
    rotary_vectors::launch::<R>(&client, count, dim, n, xa, c, s, o, out.offset, backward, rotate, dtype);
}
