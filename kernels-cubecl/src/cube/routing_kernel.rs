//! The kernel of `routing.rs` (its own module: CubeCL's `Tensor` would clash with burn's).

use cubecl::prelude::*;

use super::row_kernel::{cube_row, merge_sum};

/// Expert `CUBE_POS_X`'s slots placed: `slot_row[s]`, `row_slot[row]`, `row_token[row]` for each
/// slot `s` routed to it, and `counts[e]`. `chosen` is `[tokens, top_k]` (any strides), the
/// outputs contiguous.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn expert_rows_kernel<I: Int>(
    chosen: &Tensor<I>,
    slot_row: &mut Tensor<I>,
    row_slot: &mut Tensor<I>,
    row_token: &mut Tensor<I>,
    counts: &mut Tensor<I>,
    #[comptime] units: u32,
    #[define(I)] _dtype: StorageType,
) {
    let expert = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let top_k = chosen.shape(1);
    let slots = chosen.shape(0) * top_k;
    let (stride_t, stride_k) = (chosen.stride(0), chosen.stride(1));
    let run = slots.div_ceil(units as usize);
    let start = unit * run;
    let mut end = start + run;
    if end > slots {
        end = slots;
    }
    let target = I::cast_from(expert);

    let mut before = 0u32;
    let mut mine = 0u32;
    let mut s = start;
    while s < end {
        let c = chosen[(s / top_k) * stride_t + (s % top_k) * stride_k];
        if c < target {
            before += 1;
        }
        if c == target {
            mine += 1;
        }
        s += 1;
    }

    // Inclusive scans of both counts over the units (Hillis-Steele: read, sync, add, sync).
    let mut lt = SharedMemory::<u32>::new(units as usize);
    let mut eq = SharedMemory::<u32>::new(units as usize);
    lt[unit] = before;
    eq[unit] = mine;
    sync_cube();
    let mut offset = 1usize;
    while offset < units as usize {
        let mut add_lt = 0u32;
        let mut add_eq = 0u32;
        if unit >= offset {
            add_lt = lt[unit - offset];
            add_eq = eq[unit - offset];
        }
        sync_cube();
        lt[unit] += add_lt;
        eq[unit] += add_eq;
        sync_cube();
        offset *= 2;
    }
    let first = lt[units as usize - 1];
    let mut row = (first + eq[unit] - mine) as usize;
    if unit == 0 {
        counts[expert] = I::cast_from(eq[units as usize - 1]);
    }

    let mut s = start;
    while s < end {
        let t = s / top_k;
        if chosen[t * stride_t + (s % top_k) * stride_k] == target {
            slot_row[s] = I::cast_from(row);
            row_slot[row] = I::cast_from(s);
            row_token[row] = I::cast_from(t);
            row += 1;
        }
        s += 1;
    }
}

/// Token `cube_row()`'s output row of [`crate::routing::ExpertRoutingBackend::combine_rows`]:
/// `out[t] = sum_j weights[s] ys[slot_row[s]]` over `s = t * top_k + j`, in f32. The inputs are
/// read through their strides (burn-cubecl pads rows); `out` is contiguous `[tokens, hidden]`.
#[cube(launch)]
pub(super) fn combine_rows_kernel<E: Float>(
    ys: &Tensor<E>,
    weights: &Tensor<E>,
    slot_row: &Tensor<i32>,
    out: &mut Tensor<E>,
    top_k: u32,
    #[define(E)] _dtype: StorageType,
) {
    let t = cube_row();
    let hidden = out.shape(1);
    if t >= out.shape(0) {
        terminate!();
    }
    let k = top_k as usize;
    let (ys_row, ys_col) = (ys.stride(0), ys.stride(1));
    let mut h = UNIT_POS_X as usize;
    while h < hidden {
        let mut acc = f32::new(0.0);
        let mut j = 0usize;
        while j < k {
            let s = t * k + j;
            let row = slot_row[s * slot_row.stride(0)] as usize;
            acc += f32::cast_from(weights[s * weights.stride(0)]) * f32::cast_from(ys[row * ys_row + h * ys_col]);
            j += 1;
        }
        out[t * hidden + h] = E::cast_from(acc);
        h += CUBE_DIM_X as usize;
    }
}

/// Row `cube_row()` of [`crate::routing::ExpertRoutingBackend::combine_rows_grad`]: `d_ys[r] =
/// weights[s] dy[t]` for the slot `s = row_slot[r]` and token `t = row_token[r]`, and with
/// `with_weights` `d_weights[s] = dy[t] . ys[r]` (f32; `ys` is read only then). Inputs through
/// their strides, outputs contiguous. Units: a power of two, the cube's size.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn combine_rows_grad_kernel<E: Float>(
    dy: &Tensor<E>,
    ys: &Tensor<E>,
    weights: &Tensor<E>,
    row_slot: &Tensor<i32>,
    row_token: &Tensor<i32>,
    d_ys: &mut Tensor<E>,
    d_weights: &mut Tensor<f32>,
    #[comptime] units: u32,
    #[comptime] with_weights: bool,
    #[define(E)] _dtype: StorageType,
) {
    let r = cube_row();
    let hidden = d_ys.shape(1);
    if r >= d_ys.shape(0) {
        terminate!();
    }
    let unit = UNIT_POS_X as usize;
    let s = row_slot[r * row_slot.stride(0)] as usize;
    let t = row_token[r * row_token.stride(0)] as usize;
    let w = f32::cast_from(weights[s * weights.stride(0)]);
    let (dy_row, dy_col) = (dy.stride(0), dy.stride(1));
    let (ys_row, ys_col) = (ys.stride(0), ys.stride(1));
    let mut partial = f32::new(0.0);
    let mut h = unit;
    while h < hidden {
        let g = f32::cast_from(dy[t * dy_row + h * dy_col]);
        d_ys[r * hidden + h] = E::cast_from(g * w);
        if with_weights {
            partial += g * f32::cast_from(ys[r * ys_row + h * ys_col]);
        }
        h += units as usize;
    }
    if with_weights {
        let mut sums = SharedMemory::<f32>::new(units as usize);
        sums[unit] = partial;
        merge_sum(&mut sums, unit);
        if unit == 0 {
            d_weights[s] = sums[0];
        }
    }
}

/// One unit per vector of `N` elements of `out` (`[rows, hidden]`, contiguous): `out[r] =
/// src[index[r]]`. `src` has a unit last stride and a row stride (and offset) that `N` divides,
/// as does `hidden`; `index` any stride.
#[cube(launch)]
pub(super) fn gather_rows_kernel<E: Float, N: Size>(
    src: &Tensor<Vector<E, N>>,
    index: &Tensor<i32>,
    out: &mut Tensor<Vector<E, N>>,
    #[define(E)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let width = out.vector_size();
    let per_row = out.shape(1) / width;
    let row = i / per_row;
    let from = index[row * index.stride(0)] as usize;
    out[i] = src[(from * src.stride(0)) / width + i % per_row];
}
