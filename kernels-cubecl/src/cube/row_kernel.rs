//! The row kernel of the fused linear cross-entropy, and the grid and shared-memory sums every
//! row kernel here uses (their own module: CubeCL's `Tensor` would clash with burn's).

use cubecl::prelude::*;

/// Units per cube of [`cross_entropy_rows`] at most (and at most the device's limit); a power of
/// two, as its tree reduction needs. A chunk of the head is a few hundred rows, one cube each:
/// 1024 units a row keep enough loads in flight to fill the H200's bandwidth, 256 cannot.
pub(super) const MAX_ROW_UNITS: u32 = 1024;

/// One cube per row of `logits` (`[rows, vocab]`, f32, read through its strides: a GEMM's output
/// may have padded rows, as burn-cubecl lays tensors out on CUDA): writes the row's
/// `-log softmax(row)[target]` (0 for an ignored label) to `losses[first_token + row]` and, with
/// `write_grad`, the row's `softmax(row) - onehot(target)` (zeros when ignored) to the same row
/// of `grad` (contiguous `[rows, vocab]`, in the dtype the head's GEMMs take: no cast after).
///
/// Rows are read `N` elements at a time (a 16-byte load for f32 at `N = 4`; `N > 1` only where
/// the row is contiguous and its length and stride are multiples of `N`): with one element per
/// load the kernel ran at a fifth of the H200's bandwidth (ncu, session 16). Each unit keeps an
/// online max and sum of exponentials over a strided part of the row; the cube merges them in
/// shared memory. `units` must be a power of two and the cube's size.
#[cube(launch)]
pub(super) fn cross_entropy_rows<F: Float, G: Float, I: Numeric, N: Size>(
    logits: &Tensor<Vector<F, N>>,
    labels: &Tensor<I>,
    losses: &mut Tensor<F>,
    grad: &mut Tensor<Vector<G, N>>,
    first_token: u32,
    ignore_index: i32,
    #[comptime] units: u32,
    #[comptime] write_grad: bool,
    #[define(F, G, I)] _dtypes: [StorageType; 3],
) {
    let row = CUBE_POS_X as usize;
    let width = logits.vector_size();
    let vectors = logits.shape(1) / width;
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
    let mut target_logit = F::new(0.0);
    let mut j = UNIT_POS_X as usize;
    while j < vectors {
        let x = logits[(base + j * width * step) / width];
        let mut local = x[0];
        #[unroll]
        for k in 1..width {
            local = F::max(local, x[k]);
        }
        if local > max {
            sum = sum * (max - local).exp();
            max = local;
        }
        #[unroll]
        for k in 0..width {
            sum = sum + (x[k] - max).exp();
            if j * width + k == target {
                target_logit = x[k];
            }
        }
        j = j + units as usize;
    }

    let unit = UNIT_POS_X as usize;
    let mut maxes = SharedMemory::<F>::new(units as usize);
    let mut sums = SharedMemory::<F>::new(units as usize);
    let mut targets = SharedMemory::<F>::new(units as usize);
    maxes[unit] = max;
    sums[unit] = sum;
    // Exactly one unit saw the target; the others add 0.
    targets[unit] = target_logit;
    merge_sum(&mut targets, unit);
    merge_online_max_sum(&mut maxes, &mut sums, unit);
    let log_sum_exp = maxes[0] + sums[0].ln();

    if unit == 0 {
        let mut loss = F::new(0.0);
        if !ignored {
            loss = log_sum_exp - targets[0];
        }
        losses[token] = loss;
    }

    if write_grad {
        let out_base = row * vectors;
        let mut j = UNIT_POS_X as usize;
        while j < vectors {
            let mut out = Vector::<G, N>::empty();
            if ignored {
                out = Vector::<G, N>::new(G::new(0.0));
            } else {
                let x = logits[(base + j * width * step) / width];
                #[unroll]
                for k in 0..width {
                    let p = (x[k] - log_sum_exp).exp();
                    let mut g = p;
                    if j * width + k == target {
                        g = p - F::new(1.0);
                    }
                    out[k] = G::cast_from(g);
                }
            }
            grad[out_base + j] = out;
            j = j + units as usize;
        }
    }
}

/// Elements per load of [`cross_entropy_rows`] over an f32 `[rows, vocab]` tensor with these
/// strides: 4 (16 bytes) where the rows allow it, else 2, else 1.
pub(super) fn cross_entropy_width(vocab: usize, strides: &[usize]) -> usize {
    if strides[1] != 1 {
        return 1;
    }
    [4, 2].into_iter().find(|&w| vocab % w == 0 && strides[0] % w == 0).unwrap_or(1)
}

/// Units per cube of [`cross_entropy_rows`] for rows of `loads` loads each: a power of two, no
/// more than the loads need, [`MAX_ROW_UNITS`] or the device's `max_units` (wgpu may allow 256).
pub(super) fn cross_entropy_units(loads: usize, max_units: u32) -> u32 {
    let limit = MAX_ROW_UNITS.min(max_units);
    // The largest power of two within the limit.
    let limit = 1u32 << (31 - limit.max(1).leading_zeros());
    loads.next_power_of_two().min(limit as usize) as u32
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
