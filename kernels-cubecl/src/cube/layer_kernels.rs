//! Element-wise kernels of [`crate::layer_ops`] and [`crate::optimizer`] (their own module:
//! CubeCL's `Tensor` would clash with burn's). Arithmetic is in f32 whatever the storage dtype
//! `E` is.

use cubecl::prelude::*;

/// Offset of element `(i0, i1, i2)` of a rank-3 tensor, through its strides.
#[cube]
fn offset3<E: CubePrimitive>(t: &Tensor<E>, i0: usize, i1: usize, i2: usize) -> usize {
    i0 * t.stride(0) + i1 * t.stride(1) + i2 * t.stride(2)
}

/// Index in `t` (rank 3, unit last stride, other strides multiples of `width`) of the vector
/// of `width` elements that starts at element `e` of a contiguous `[a, b, c]` tensor.
#[cube]
fn vector_at3<E: CubePrimitive>(t: &Tensor<E>, e: usize, b: usize, c: usize, width: usize) -> usize {
    offset3(t, e / (c * b), (e / c) % b, e % c) / width
}

/// `1 / (1 + exp(-g))` lane by lane.
#[cube]
fn sigmoid<N: Size>(g: Vector<f32, N>) -> Vector<f32, N> {
    let one = Vector::<f32, N>::new(f32::new(1.0));
    one / (one + (Vector::<f32, N>::new(f32::new(0.0)) - g).exp())
}

/// One unit per vector of `N` elements of `out` (`[a, b, c]`, contiguous): `silu(gate) * up`.
/// The launcher sees that `gate` and `up` have unit last strides and other strides (and
/// offsets) that are multiples of `N`, and that `N` divides `c`: the two halves of a fused
/// gate/up output qualify.
#[cube(launch)]
pub(super) fn swiglu_vectors<E: Float, N: Size>(
    gate: &Tensor<Vector<E, N>>,
    up: &Tensor<Vector<E, N>>,
    out: &mut Tensor<Vector<E, N>>,
    #[define(E)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let width = out.vector_size();
    let (b, c, e) = (out.shape(1), out.shape(2), i * width);
    let g = Vector::<f32, N>::cast_from(gate[vector_at3(gate, e, b, c, width)]);
    let u = Vector::<f32, N>::cast_from(up[vector_at3(up, e, b, c, width)]);
    out[i] = Vector::<E, N>::cast_from(g * sigmoid(g) * u);
}

/// One unit per vector of `N` elements of `out` (`[a, b, c]`, contiguous): `silu(g) * u` with
/// `g` and `u` the halves of the contiguous packed gate/up output `packed` (`[a, b, 2c]`). The
/// launcher sees that `N` divides `c`.
#[cube(launch)]
pub(super) fn swiglu_packed_vectors<E: Float, N: Size>(packed: &Tensor<Vector<E, N>>, out: &mut Tensor<Vector<E, N>>, #[define(E)] _dtype: StorageType) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let c = out.shape(2) / out.vector_size();
    let gate_at = (i / c) * 2 * c + i % c;
    let g = Vector::<f32, N>::cast_from(packed[gate_at]);
    let u = Vector::<f32, N>::cast_from(packed[gate_at + c]);
    out[i] = Vector::<E, N>::cast_from(g * sigmoid(g) * u);
}

/// One unit per vector of `N` elements of `grad` (`[a, b, c]`, contiguous): SwiGLU's gradient
/// of the packed input ([`swiglu_packed_vectors`]) into `d_packed` (`[a, b, 2c]`, contiguous),
/// `d g` in the first half of each row and `d u` in the second, as [`swiglu_grad_vectors`]
/// computes them.
#[cube(launch)]
pub(super) fn swiglu_packed_grad_vectors<E: Float, N: Size>(
    packed: &Tensor<Vector<E, N>>,
    grad: &Tensor<Vector<E, N>>,
    d_packed: &mut Tensor<Vector<E, N>>,
    #[define(E)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= grad.len() {
        terminate!();
    }
    let c = grad.shape(2) / grad.vector_size();
    let gate_at = (i / c) * 2 * c + i % c;
    let g = Vector::<f32, N>::cast_from(packed[gate_at]);
    let u = Vector::<f32, N>::cast_from(packed[gate_at + c]);
    let dy = Vector::<f32, N>::cast_from(grad[i]);
    let s = sigmoid(g);
    d_packed[gate_at] = Vector::<E, N>::cast_from(swiglu_d_gate(g, u, s, dy));
    d_packed[gate_at + c] = Vector::<E, N>::cast_from(swiglu_d_up(g, s, dy));
}

/// SwiGLU's `d gate = dy up s (1 + g (1 - s))`, with `s = sigmoid(g)`.
#[cube]
fn swiglu_d_gate<N: Size>(g: Vector<f32, N>, u: Vector<f32, N>, s: Vector<f32, N>, dy: Vector<f32, N>) -> Vector<f32, N> {
    let one = Vector::<f32, N>::new(f32::new(1.0));
    dy * u * s * (one + g * (one - s))
}

/// SwiGLU's `d up = dy g s`, with `s = sigmoid(g)`.
#[cube]
fn swiglu_d_up<N: Size>(g: Vector<f32, N>, s: Vector<f32, N>, dy: Vector<f32, N>) -> Vector<f32, N> {
    dy * g * s
}

/// One unit per vector of `N` elements: SwiGLU's `d gate = dy up s (1 + g (1 - s))` and
/// `d up = dy g s` into `d_gate` / `d_up` (`[a, b, c]`, contiguous; one that is not wanted is a
/// placeholder never written); the inputs as [`swiglu_vectors`] reads them.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn swiglu_grad_vectors<E: Float, N: Size>(
    gate: &Tensor<Vector<E, N>>,
    up: &Tensor<Vector<E, N>>,
    grad: &Tensor<Vector<E, N>>,
    d_gate: &mut Tensor<Vector<E, N>>,
    d_up: &mut Tensor<Vector<E, N>>,
    #[comptime] want_gate: bool,
    #[comptime] want_up: bool,
    #[define(E)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= grad.len() {
        terminate!();
    }
    let width = grad.vector_size();
    let (b, c, e) = (grad.shape(1), grad.shape(2), i * width);
    let g = Vector::<f32, N>::cast_from(gate[vector_at3(gate, e, b, c, width)]);
    let dy = Vector::<f32, N>::cast_from(grad[vector_at3(grad, e, b, c, width)]);
    let s = sigmoid(g);
    if want_up {
        d_up[i] = Vector::<E, N>::cast_from(swiglu_d_up(g, s, dy));
    }
    if want_gate {
        let u = Vector::<f32, N>::cast_from(up[vector_at3(up, e, b, c, width)]);
        d_gate[i] = Vector::<E, N>::cast_from(swiglu_d_gate(g, u, s, dy));
    }
}

/// One unit per vector of `N` elements of `out` (`[batch, heads, seq, d]`, any strides, from
/// element `out_offset` of its buffer: a view of a packed tensor): the rotary embedding of `x` with the f32 tables `cos` / `sin`
/// (`[batch or 1, 1, seq, d]`), or with `backward` its gradient from `x` = the upstream
/// gradient: forward `y_j = x_j cos_j + sign_j x_p sin_j`, backward
/// `dx_j = dy_j cos_j - sign_j dy_p sin_p`, where `p` is `j`'s partner in the other half and
/// `sign` is -1 in the first half, +1 in the second; without `rotate`, `x` copied (the v heads
/// of a packed q/k/v). The launcher sees that `x`, `out`, `cos` and `sin` have unit last strides
/// and other strides (and `out_offset`) that are multiples of `N`, and that `N` divides `d / 2`, so a vector and
/// its partner lie each in one half (`N` = 1 always does).
#[cube(launch)]
pub(super) fn rotary_vectors<E: Float, N: Size>(
    x: &Tensor<Vector<E, N>>,
    cos: &Tensor<Vector<f32, N>>,
    sin: &Tensor<Vector<f32, N>>,
    out: &mut Tensor<Vector<E, N>>,
    out_offset: usize,
    #[comptime] backward: bool,
    #[comptime] rotate: bool,
    #[define(E)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    let width = out.vector_size();
    let d = out.shape(3);
    let seq = out.shape(2);
    let heads = out.shape(1);
    if i * width >= out.shape(0) * heads * seq * d {
        terminate!();
    }
    let e = i * width;
    let j = e % d;
    let s = (e / d) % seq;
    let h = (e / (d * seq)) % heads;
    let b = e / (d * seq * heads);
    let x_base = b * x.stride(0) + h * x.stride(1) + s * x.stride(2);
    let at = (out_offset + b * out.stride(0) + h * out.stride(1) + s * out.stride(2) + j) / width;
    if rotate {
        let half = d / 2;
        let mut p = j + half;
        let mut sign = f32::new(-1.0);
        if j >= half {
            p = j - half;
            sign = f32::new(1.0);
        }
        let table_b = b % cos.shape(0);
        let cos_base = table_b * cos.stride(0) + s * cos.stride(2);
        let sin_base = table_b * sin.stride(0) + s * sin.stride(2);
        let xj = Vector::<f32, N>::cast_from(x[(x_base + j) / width]);
        let xp = Vector::<f32, N>::cast_from(x[(x_base + p) / width]);
        let c = cos[(cos_base + j) / width];
        let sign = Vector::<f32, N>::new(sign);
        if backward {
            out[at] = Vector::<E, N>::cast_from(xj * c - sign * xp * sin[(sin_base + p) / width]);
        } else {
            out[at] = Vector::<E, N>::cast_from(xj * c + sign * xp * sin[(sin_base + j) / width]);
        }
    } else {
        out[at] = x[(x_base + j) / width];
    }
}
