//! Row kernels of RMSNorm, forward and backward, and the gradient norm's chunked sums of
//! squares (their own module: CubeCL's `Tensor` would clash with burn's). RMSNorm: one cube per
//! row of `x` (`[rows, n]`, any strides); each sum is a tree in shared memory, as the
//! cross-entropy's. Arithmetic is in f32 whatever `E` is.

use cubecl::prelude::*;

use super::row_kernel::{cube_row, merge_sum};

/// Writes `round(round(x * rstd) * round(w))` to `out` (`[rows, n]`, contiguous) and each row's
/// `rstd = 1 / sqrt(mean(x^2) + eps)` to `rstd` (`[rows]`, contiguous): transformers' order of
/// rounding, the plain-Burn [`crate::layer_ops::rms_norm_parts`]. `weight` is f32 (`[n]`, any
/// stride), rounded to `E` as the definition rounds it. `units` is a power of two and the cube's
/// size.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn rms_norm_rows<E: Float>(
    x: &Tensor<E>,
    weight: &Tensor<f32>,
    out: &mut Tensor<E>,
    rstd: &mut Tensor<f32>,
    eps: f32,
    n_f32: f32,
    #[comptime] units: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = cube_row();
    if row >= rstd.len() {
        terminate!();
    }
    let n = x.shape(1);
    let base = row * x.stride(0);
    let step = x.stride(1);
    let unit = UNIT_POS_X as usize;

    let mut sum = f32::new(0.0);
    let mut j = unit;
    while j < n {
        let v = f32::cast_from(x[base + j * step]);
        sum = sum + v * v;
        j = j + units as usize;
    }
    let r = row_rstd(sum, rstd, row, unit, eps, n_f32, units);

    let out_base = row * n;
    let mut j = unit;
    while j < n {
        out[out_base + j] = normed_element::<E>(x[base + j * step], r, weight[j * weight.stride(0)]);
        j = j + units as usize;
    }
}

/// The row's `rstd = 1 / sqrt(mean(x^2) + eps)` from each unit's partial sum of squares (a tree
/// in shared memory), written to `rstd[row]` by unit 0.
#[cube]
fn row_rstd(partial: f32, rstd: &mut Tensor<f32>, row: usize, unit: usize, eps: f32, n_f32: f32, #[comptime] units: u32) -> f32 {
    let mut sums = SharedMemory::<f32>::new(units as usize);
    sums[unit] = partial;
    merge_sum(&mut sums, unit);
    let r = f32::new(1.0) / (sums[0] / n_f32 + eps).sqrt();
    if unit == 0 {
        rstd[row] = r;
    }
    r
}

/// `round(round(x * rstd) * round(w))`: transformers' order of rounding.
#[cube]
fn normed_element<E: Float>(x: E, r: f32, w: f32) -> E {
    let normed = E::cast_from(f32::cast_from(x) * r);
    E::cast_from(f32::cast_from(normed) * f32::cast_from(E::cast_from(w)))
}

/// [`rms_norm_rows`] of `h = round(x + delta)`, with `h` written to `sum` (`[rows, n]`,
/// contiguous) on the way: [`crate::residual_norm::add_rms_norm_parts`]. `x` and `delta` have
/// any strides. Each unit reads back in the second pass only the elements of `sum` it wrote in
/// the first.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn add_rms_norm_rows<E: Float>(
    x: &Tensor<E>,
    delta: &Tensor<E>,
    weight: &Tensor<f32>,
    sum: &mut Tensor<E>,
    out: &mut Tensor<E>,
    rstd: &mut Tensor<f32>,
    eps: f32,
    n_f32: f32,
    #[comptime] units: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = cube_row();
    if row >= rstd.len() {
        terminate!();
    }
    let n = x.shape(1);
    let (x_base, x_step) = (row * x.stride(0), x.stride(1));
    let (d_base, d_step) = (row * delta.stride(0), delta.stride(1));
    let out_base = row * n;
    let unit = UNIT_POS_X as usize;

    let mut squares = f32::new(0.0);
    let mut j = unit;
    while j < n {
        let h = E::cast_from(f32::cast_from(x[x_base + j * x_step]) + f32::cast_from(delta[d_base + j * d_step]));
        sum[out_base + j] = h;
        let v = f32::cast_from(h);
        squares = squares + v * v;
        j = j + units as usize;
    }
    let r = row_rstd(squares, rstd, row, unit, eps, n_f32, units);

    let mut j = unit;
    while j < n {
        out[out_base + j] = normed_element::<E>(sum[out_base + j], r, weight[j * weight.stride(0)]);
        j = j + units as usize;
    }
}

/// RMSNorm's `dx` from the forward's `rstd` (`[rows]`, any stride) and the upstream `grad`
/// (`[rows, n]`, any strides) into `dx` (`[rows, n]`, contiguous): with `xr = x rstd` and
/// `g = grad w`, `dx = (g - xr mean(g xr)) rstd`, as [`crate::layer_ops::rms_norm_grad`].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn rms_norm_grad_rows<E: Float>(
    x: &Tensor<E>,
    weight: &Tensor<f32>,
    rstd: &Tensor<f32>,
    grad: &Tensor<E>,
    dx: &mut Tensor<E>,
    n_f32: f32,
    rows: u32,
    #[comptime] units: u32,
    #[define(E)] _dtype: StorageType,
) {
    let row = cube_row();
    if row >= rows as usize {
        terminate!();
    }
    let n = x.shape(1);
    let x_base = row * x.stride(0);
    let x_step = x.stride(1);
    let g_base = row * grad.stride(0);
    let g_step = grad.stride(1);
    let w_step = weight.stride(0);
    let r = rstd[row * rstd.stride(0)];
    let unit = UNIT_POS_X as usize;

    let mut dot = f32::new(0.0);
    let mut j = unit;
    while j < n {
        let g = f32::cast_from(grad[g_base + j * g_step]) * weight[j * w_step];
        dot = dot + g * f32::cast_from(x[x_base + j * x_step]) * r;
        j = j + units as usize;
    }
    let mut sums = SharedMemory::<f32>::new(units as usize);
    sums[unit] = dot;
    merge_sum(&mut sums, unit);
    let mean = sums[0] / n_f32;

    let out_base = row * n;
    let mut j = unit;
    while j < n {
        let g = f32::cast_from(grad[g_base + j * g_step]) * weight[j * w_step];
        let xr = f32::cast_from(x[x_base + j * x_step]) * r;
        dx[out_base + j] = E::cast_from((g - xr * mean) * r);
        j = j + units as usize;
    }
}
