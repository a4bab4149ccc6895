//! The kernel of `routing.rs` (its own module: CubeCL's `Tensor` would clash with burn's).

use cubecl::prelude::*;

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
