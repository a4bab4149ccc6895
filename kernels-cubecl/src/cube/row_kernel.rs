//! The row kernel of the fused linear cross-entropy, and the grid and shared-memory sums every
//! row kernel here uses (their own module: CubeCL's `Tensor` would clash with burn's).

use cubecl::prelude::*;

/// Units per cube of [`cross_entropy_rows`] at most; a power of two, as its tree reduction needs.
pub(super) const MAX_ROW_UNITS: u32 = 256;

/// One cube per row of `logits` (`[rows, vocab]`, f32, read and written through its strides: a
/// GEMM's output may have padded rows, as burn-cubecl lays tensors out on CUDA): writes the row's
/// `-log softmax(row)[target]` (0 for an ignored label) to `losses[first_token + row]` and, with
/// `write_grad`, overwrites the row with `softmax(row) - onehot(target)` (zeros when ignored).
///
/// Each unit keeps an online max and sum of exponentials over a strided part of the row; the
/// cube merges them in shared memory. `units` must be a power of two and the cube's size.
#[cube(launch)]
pub(super) fn cross_entropy_rows<F: Float, I: Numeric>(
    logits: &mut Tensor<F>,
    labels: &Tensor<I>,
    losses: &mut Tensor<F>,
    first_token: u32,
    ignore_index: i32,
    #[comptime] units: u32,
    #[comptime] write_grad: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS_X as usize;
    let vocab = logits.shape(1);
    let base = row * logits.stride(0);
    let step = logits.stride(1);
    let token = first_token as usize + row;
    let ignored = i32::cast_from(labels[token]) == ignore_index;
    let target = u32::cast_from(labels[token]) as usize;

    // A finite floor instead of -inf: WGSL has no -inf literal, and exp(floor - floor) stays
    // finite for units that saw no element (their sum is 0, so they add nothing).
    // (Plain assignments throughout: CubeCL refuses `+=` on variables it treats as constants.)
    let mut max = F::new(-3.0e38);
    let mut sum = F::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < vocab {
        let x = logits[base + j * step];
        if x > max {
            sum = sum * (max - x).exp() + F::new(1.0);
            max = x;
        } else {
            sum = sum + (x - max).exp();
        }
        j = j + units as usize;
    }

    // Read before the barriers below, hence before any unit overwrites the row.
    let mut target_logit = F::new(0.0);
    if !ignored {
        target_logit = logits[base + target * step];
    }

    let unit = UNIT_POS_X as usize;
    let mut maxes = SharedMemory::<F>::new(units as usize);
    let mut sums = SharedMemory::<F>::new(units as usize);
    maxes[unit] = max;
    sums[unit] = sum;
    merge_online_max_sum(&mut maxes, &mut sums, unit);
    let log_sum_exp = maxes[0] + sums[0].ln();

    if unit == 0 {
        let mut loss = F::new(0.0);
        if !ignored {
            loss = log_sum_exp - target_logit;
        }
        losses[token] = loss;
    }

    if write_grad {
        let mut j = UNIT_POS_X as usize;
        while j < vocab {
            let mut grad = F::new(0.0);
            if !ignored {
                let p = (logits[base + j * step] - log_sum_exp).exp();
                if j == target {
                    grad = p - F::new(1.0);
                } else {
                    grad = p;
                }
            }
            logits[base + j * step] = grad;
            j = j + units as usize;
        }
    }
}

/// Merges each unit's online `(max, sum of exp(x - max))`, written at `maxes[unit]` /
/// `sums[unit]`, into the cube's: a tree in shared memory over the cube's units (a power of
/// two), leaving the row's pair at index 0 for every unit to read.
#[cube]
pub(super) fn merge_online_max_sum<F: Float>(maxes: &mut SharedMemory<F>, sums: &mut SharedMemory<F>, unit: usize) {
    sync_cube();
    let mut half = (CUBE_DIM_X / 2) as usize;
    while half > 0 {
        if unit < half {
            let max_a = maxes[unit];
            let max_b = maxes[unit + half];
            let sum_a = sums[unit];
            let sum_b = sums[unit + half];
            let merged = F::max(max_a, max_b);
            sums[unit] = sum_a * (max_a - merged).exp() + sum_b * (max_b - merged).exp();
            maxes[unit] = merged;
        }
        sync_cube();
        half = half / 2;
    }
}

/// Sums each unit's `sums[unit]` into `sums[0]`: a tree in shared memory over the cube's units
/// (a power of two), left for every unit to read.
#[cube]
pub(super) fn merge_sum<F: Float>(sums: &mut SharedMemory<F>, unit: usize) {
    sync_cube();
    let mut half = (CUBE_DIM_X / 2) as usize;
    while half > 0 {
        if unit < half {
            sums[unit] = sums[unit] + sums[unit + half];
        }
        sync_cube();
        half = half / 2;
    }
}

/// This cube's row: cubes span a 2-D grid ([`row_cubes`]), as one axis holds only 65535 of them.
#[cube]
pub(super) fn cube_row() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
}

/// Cubes per grid axis at most: 65535 is all WebGPU/Vulkan promise.
const MAX_CUBES_X: usize = 65_535;

/// A 2-D grid of at least `rows` cubes, one per row ([`cube_row`]; the kernels skip the surplus).
pub(super) fn row_cubes(rows: usize) -> CubeCount {
    let x = rows.clamp(1, MAX_CUBES_X);
    CubeCount::Static(x as u32, rows.div_ceil(x) as u32, 1)
}

/// Units per row of `n` elements: `n` rounded up to a power of two, at most `max`.
pub(super) fn row_units(n: usize, max: u32) -> u32 {
    n.next_power_of_two().min(max as usize) as u32
}
