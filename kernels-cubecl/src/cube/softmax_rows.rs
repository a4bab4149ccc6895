//! Row kernels of the blockwise attention's softmax, forward and backward (their own module:
//! CubeCL's `Tensor` would clash with burn's).
//!
//! Rows are those of one query block's scores `[batch, heads, rows, keys]` (contiguous, in the
//! input dtype `E`), one cube per row; the mask block `[batch, 1, rows, keys]` and the per-row
//! f32 tensors `[batch, heads, rows]` are read through their strides, so views of larger
//! tensors need no copy. Arithmetic is in f32 whatever `E` is.

use cubecl::prelude::*;

use super::row_kernel::{cube_row, merge_online_max_sum};

/// Units per cube at most; a power of two, as the forward's tree reduction needs.
pub(super) const MAX_ROW_UNITS: u32 = 256;

/// A finite floor instead of -inf: WGSL has no -inf literal. Any unmasked score is above it
/// (the plain-Burn softmax's test for a row that reads no key).
const FLOOR: f32 = crate::attention::EMPTY_ROW_FLOOR;

/// Offset of row `row`'s element in a `[batch, heads, rows, ..]` tensor (a mask block has
/// `heads = 1` and is broadcast, hence `head_stride = 0` there).
#[cube]
fn row_offset(row: usize, heads: usize, block_rows: usize, batch_stride: usize, head_stride: usize, row_stride: usize) -> usize {
    let batch = row / (heads * block_rows);
    let head = (row / block_rows) % heads;
    batch * batch_stride + head * head_stride + (row % block_rows) * row_stride
}

/// Offset of `row` in a per-row `[batch, heads, rows]` tensor.
#[cube]
fn per_row_offset(t: &Tensor<f32>, row: usize, heads: usize, block_rows: usize) -> usize {
    row_offset(row, heads, block_rows, t.stride(0), t.stride(1), t.stride(2))
}

/// Offset of `row`'s first key in the mask block `[batch, 1, rows, keys]`.
#[cube]
fn mask_offset<M: Int>(mask: &Tensor<M>, row: usize, heads: usize, block_rows: usize) -> usize {
    row_offset(row, heads, block_rows, mask.stride(0), 0, mask.stride(2))
}

/// One cube per row of `scores` (`[batch, heads, block_rows, keys]`, contiguous): writes
/// `softmax(scores * scale)` over the keys the mask lets the row read (masked entries 0) to
/// `probs` (same shape, contiguous) and `L = max + ln(sum exp)` to `lse` (`[batch, heads,
/// block_rows]`, contiguous). A row that may read no key gets probabilities 0 and `L = inf`, as
/// the plain-Burn default (`inf` is an argument because WGSL has no infinity literal).
///
/// Each unit keeps an online max and sum of exponentials over a strided part of the row; the
/// cube merges them in shared memory. `units` must be a power of two and the cube's size.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn softmax_rows<E: Float, M: Int>(
    scores: &Tensor<E>,
    mask: &Tensor<M>,
    probs: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    scale: f32,
    inf: f32,
    #[comptime] units: u32,
    #[define(E, M)] _dtypes: [StorageType; 2],
) {
    let row = cube_row();
    if row >= lse.len() {
        terminate!();
    }
    let heads = scores.shape(1);
    let block_rows = scores.shape(2);
    let keys = scores.shape(3);
    let base = row * keys;
    let mask_base = mask_offset(mask, row, heads, block_rows);
    let mask_step = mask.stride(3);
    let unit = UNIT_POS_X as usize;

    // (Plain assignments throughout: CubeCL refuses `+=` on variables it treats as constants.)
    let mut max = f32::new(FLOOR);
    let mut sum = f32::new(0.0);
    let mut j = unit;
    while j < keys {
        if mask[mask_base + j * mask_step] == M::new(0) {
            let x = f32::cast_from(scores[base + j]) * scale;
            if x > max {
                sum = sum * (max - x).exp() + 1.0;
                max = x;
            } else {
                sum = sum + (x - max).exp();
            }
        }
        j = j + units as usize;
    }

    let mut maxes = SharedMemory::<f32>::new(units as usize);
    let mut sums = SharedMemory::<f32>::new(units as usize);
    maxes[unit] = max;
    sums[unit] = sum;
    merge_online_max_sum(&mut maxes, &mut sums, unit);
    let row_max = maxes[0];
    let row_sum = sums[0];
    // A unit that saw the row's max added exp(0) = 1: only a row without a readable key sums to 0.
    let empty = row_sum == 0.0;

    if unit == 0 {
        let mut l = inf;
        if !empty {
            l = row_max + row_sum.ln();
        }
        lse[row] = l;
    }
    let mut j = unit;
    while j < keys {
        let mut p = f32::new(0.0);
        if !empty && mask[mask_base + j * mask_step] == M::new(0) {
            p = (f32::cast_from(scores[base + j]) * scale - row_max).exp() / row_sum;
        }
        probs[base + j] = E::cast_from(p);
        j = j + units as usize;
    }
}

/// One cube per row of `scores` (`[batch, heads, block_rows, keys]`, contiguous): with
/// `P = exp(scores * scale - L)` (masked entries 0) writes `P` to `probs` when `write_probs` and
/// `dS = P (dP - delta)` to `d_scores` when `write_grad` (both like `scores`; `d_probs` too).
/// `lse` and `delta` are `[batch, heads, block_rows]`, any strides. A row that may read no key
/// has `L = inf` and every entry 0; no NaN test is needed (CUDA's fast maths may drop one).
/// Element-wise: the units stride along the row without meeting.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn softmax_grad_rows<E: Float, M: Int>(
    scores: &Tensor<E>,
    mask: &Tensor<M>,
    lse: &Tensor<f32>,
    d_probs: &Tensor<E>,
    delta: &Tensor<f32>,
    probs: &mut Tensor<E>,
    d_scores: &mut Tensor<E>,
    scale: f32,
    rows: u32,
    #[comptime] units: u32,
    #[comptime] write_probs: bool,
    #[comptime] write_grad: bool,
    #[define(E, M)] _dtypes: [StorageType; 2],
) {
    let row = cube_row();
    if row >= rows as usize {
        terminate!();
    }
    let heads = scores.shape(1);
    let block_rows = scores.shape(2);
    let keys = scores.shape(3);
    let base = row * keys;
    let mask_base = mask_offset(mask, row, heads, block_rows);
    let mask_step = mask.stride(3);
    let l = lse[per_row_offset(lse, row, heads, block_rows)];
    let mut d = f32::new(0.0);
    if write_grad {
        d = delta[per_row_offset(delta, row, heads, block_rows)];
    }
    let mut j = UNIT_POS_X as usize;
    while j < keys {
        let mut p = f32::new(0.0);
        if mask[mask_base + j * mask_step] == M::new(0) {
            p = (f32::cast_from(scores[base + j]) * scale - l).exp();
        }
        if write_probs {
            probs[base + j] = E::cast_from(p);
        }
        if write_grad {
            d_scores[base + j] = E::cast_from(p * (f32::cast_from(d_probs[base + j]) - d));
        }
        j = j + units as usize;
    }
}
