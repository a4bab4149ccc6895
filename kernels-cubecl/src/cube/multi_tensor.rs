//! Multi-tensor kernels (torch's `multi_tensor_apply`): one launch over a list of tensors, each
//! its own buffer binding, the cubes laid end to end over them. Cube `c` works on chunk
//! `c - first(t)` of the tensor `t` whose cubes cover `c`; the list is a comptime `Sequence`, so
//! the lookup is an unrolled chain of range tests and the kernel compiles once per list length
//! and dtype. (Their own module: CubeCL's `Tensor` would clash with burn's.)

use cubecl::prelude::*;

use super::row_kernel::{cube_row, merge_sum};

/// AdamW over the tensors of `params` (`E`) into `params_out`, the f32 moments `m[t]`, `v[t]`
/// updated in place, from `grads[t]` (f32) times `grad_scale[0]`; every tensor contiguous, a
/// parameter's moments, gradient and output of its length. Each cube updates `per_cube`
/// elements of one tensor. torch's order of operations: `p *= 1 - lr wd`, then
/// `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn adamw_tensors<E: Float>(
    params: &Sequence<Tensor<E>>,
    params_out: &mut Sequence<Tensor<E>>,
    grads: &Sequence<Tensor<f32>>,
    m: &mut Sequence<Tensor<f32>>,
    v: &mut Sequence<Tensor<f32>>,
    grad_scale: &Tensor<f32>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    #[comptime] per_cube: usize,
    #[define(E)] _dtype: StorageType,
) {
    let cube = cube_row();
    let scale = grad_scale[0];
    let count = comptime!(params.len());
    let mut first = 0usize;
    #[unroll]
    for t in 0..count {
        let n = params.index(t).len();
        let cubes = n.div_ceil(per_cube);
        if cube >= first && cube < first + cubes {
            let (p, out) = (params.index(t), params_out.index_mut(t));
            let (g, m, v) = (grads.index(t), m.index_mut(t), v.index_mut(t));
            let end = (cube - first + 1) * per_cube;
            let mut i = (cube - first) * per_cube + UNIT_POS_X as usize;
            while i < end && i < n {
                let gi = g[i] * scale;
                let m1 = beta1 * m[i] + (f32::new(1.0) - beta1) * gi;
                let v1 = beta2 * v[i] + (f32::new(1.0) - beta2) * gi * gi;
                let mut x = f32::cast_from(p[i]);
                x = x * (f32::new(1.0) - lr * decay);
                x = x - step_size * m1 / (v1.sqrt() / bc2_sqrt + eps);
                out[i] = E::cast_from(x);
                m[i] = m1;
                v[i] = v1;
                i = i + CUBE_DIM_X as usize;
            }
        }
        first = first + cubes;
    }
}

/// Each cube's sum of squares of `per_cube` elements of one tensor of `grads` (contiguous, any
/// float dtype) to `partials[offset + c]`, the cubes laid end to end over the tensors as in
/// [`adamw_tensors`]. `units` is a power of two and the cube's size.
#[cube(launch)]
pub(super) fn square_sum_tensors<E: Float>(
    grads: &Sequence<Tensor<E>>,
    partials: &mut Tensor<f32>,
    offset: u32,
    #[comptime] units: u32,
    #[comptime] per_cube: usize,
    #[define(E)] _dtype: StorageType,
) {
    let cube = cube_row();
    let unit = UNIT_POS_X as usize;
    let count = comptime!(grads.len());
    let mut first = 0usize;
    let mut sum = f32::new(0.0);
    let mut mine = false;
    #[unroll]
    for t in 0..count {
        let g = grads.index(t);
        let n = g.len();
        let cubes = n.div_ceil(per_cube);
        if cube >= first && cube < first + cubes {
            mine = true;
            let end = (cube - first + 1) * per_cube;
            let mut i = (cube - first) * per_cube + unit;
            while i < end && i < n {
                let x = f32::cast_from(g[i]);
                sum = sum + x * x;
                i = i + units as usize;
            }
        }
        first = first + cubes;
    }
    // Cubes past the last tensor (the grid is rounded up) leave before the shared sum; the
    // others all reach its barriers.
    if !mine {
        terminate!();
    }
    let mut sums = SharedMemory::<f32>::new(units as usize);
    sums[unit] = sum;
    merge_sum(&mut sums, unit);
    if unit == 0 {
        partials[offset as usize + cube] = sums[0];
    }
}
