//! The copies that feed the register flash kernels ([`super::flash_mma`]): input tiles from
//! global to shared memory by `cp.async` (no register on the way, every copy of a unit in flight
//! at once), and the two-stage walk over blocks in which the next block's tiles arrive while this
//! one is computed, each half's completion a phase of its own mbarrier.

use cubecl::prelude::barrier::{copy_async_checked, Barrier};
use cubecl::prelude::*;

use super::flash_mma::{KEYS, PAD, UNITS};

/// Shared bytes of the two barriers of a kernel's two-stage walk ([`copy_next`]).
pub(super) const BARRIERS: usize = 16;

/// Whether inputs loaded `width` elements at a time (2-byte elements) can be copied by
/// `cp.async`, which moves 4, 8 or 16 bytes a copy: inputs aligned only for one element a load
/// take the shared-memory kernels.
pub(super) fn copies_async(width: usize) -> bool {
    width >= 2
}

/// Where the rows of one (batch, head) of an input (`[batch, heads, seq, d]`, unit last stride)
/// start and how far apart they are, in vectors of its width, and how many there are: read from
/// the tensor's metadata once, not at every copy.
#[derive(CubeType, Clone, Copy)]
pub(super) struct HeadRows {
    base: usize,
    stride: usize,
    seq: usize,
}

/// [`HeadRows`] of head `head` of batch `batch` of `src`.
#[cube]
pub(super) fn head_rows<E: Float, N: Size>(src: &Tensor<Vector<E, N>>, batch: usize, head: usize) -> HeadRows {
    let width = src.vector_size();
    HeadRows { base: (batch * src.stride(0) + head * src.stride(1)) / width, stride: src.stride(2) / width, seq: src.shape(2) }
}

/// Starts copying rows `[row0, row0 + rows)` of `from` (rows of `src`) into `dst` from its row
/// `at` (row stride `d + PAD`): `cp.async`, a vector (16 bytes at width 8) a copy, global memory
/// to shared without a register, zeros past the sequence. Every unit issues its copies at once,
/// so their latencies overlap; they are done once a barrier they were committed to
/// (`commit_copy_async`) completes its phase.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn copy_tile<E: Float, N: Size>(
    src: &Tensor<Vector<E, N>>,
    from: HeadRows,
    row0: usize,
    dst: &mut SharedMemory<Vector<E, N>>,
    at: usize,
    #[comptime] rows: usize,
    #[comptime] d: usize,
) {
    let width = src.vector_size();
    let per_row = comptime![d / width];
    let stride = comptime![(d + PAD) / width];
    // Copy `n` of a unit takes vector `UNIT_POS + n UNITS` of the tile: where UNITS vectors are
    // whole rows, its row is the unit's first plus a constant and its column the unit's first.
    let first_r = UNIT_POS as usize / per_row;
    let first_c = UNIT_POS as usize % per_row;
    #[unroll]
    for n in 0..comptime![rows * per_row / UNITS] {
        let mut r = first_r + comptime![n * (UNITS / per_row)];
        let mut c = first_c;
        if comptime![!UNITS.is_multiple_of(per_row)] {
            let i = UNIT_POS as usize + n * UNITS;
            r = i / per_row;
            c = i % per_row;
        }
        let row = row0 + r;
        // A row past the sequence copies nothing and zero-fills (its address is row 0's).
        let mut start = from.base + c;
        let mut len = 0usize;
        if row < from.seq {
            start += row * from.stride;
            len = 1;
        }
        let to = (at + r) * stride + c;
        copy_async_checked(&src.slice(start, start + len), &mut dst.slice_mut(to, to + 1), comptime![width as u32]);
    }
}

/// Starts copying the tiles of step `i + 1` of a two-stage walk over blocks: rows `[row0, row0 +
/// rows)` of `a` and `b` into the half `(i + 1) % 2` of `a_s` and `b_s` (their rows `rows ((i +
/// 1) % 2) ..`), committed to that half's barrier (`bar_0`, `bar_1`), so they arrive while step
/// `i` is computed. The caller makes sure no plane still reads that half (step `i - 1`'s).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn copy_next<E: Float, N: Size>(
    a: &Tensor<Vector<E, N>>,
    a_rows: HeadRows,
    b: &Tensor<Vector<E, N>>,
    b_rows: HeadRows,
    row0: usize,
    a_s: &mut SharedMemory<Vector<E, N>>,
    b_s: &mut SharedMemory<Vector<E, N>>,
    bar_0: &Shared<Barrier>,
    bar_1: &Shared<Barrier>,
    i: usize,
    #[comptime] rows: usize,
    #[comptime] d: usize,
) {
    let at = ((i + 1) % 2) * rows;
    copy_tile::<E, N>(a, a_rows, row0, a_s, at, rows, d);
    copy_tile::<E, N>(b, b_rows, row0, b_s, at, rows, d);
    if i % 2 == 0 {
        bar_1.commit_copy_async();
        let _arrived = bar_1.arrive();
    } else {
        bar_0.commit_copy_async();
        let _arrived = bar_0.arrive();
    }
}

/// Step 0 of a query block's walk over its key blocks `[first, end)` ([`copy_next`]): copies
/// block `first`'s keys and values into the first half of `k_s` and `v_s` (none where the walk is
/// empty), commits them with every copy this unit issued before (the query block's own tiles) to
/// `bar_0`, and waits for all of them.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn first_key_tiles<E: Float, N: Size>(
    k: &Tensor<Vector<E, N>>,
    k_rows: HeadRows,
    v: &Tensor<Vector<E, N>>,
    v_rows: HeadRows,
    k_s: &mut SharedMemory<Vector<E, N>>,
    v_s: &mut SharedMemory<Vector<E, N>>,
    bar_0: &Shared<Barrier>,
    first: usize,
    end: usize,
    #[comptime] d: usize,
) {
    if first < end {
        copy_tile::<E, N>(k, k_rows, first * KEYS, k_s, 0usize, KEYS, d);
        copy_tile::<E, N>(v, v_rows, first * KEYS, v_s, 0usize, KEYS, d);
    }
    bar_0.commit_copy_async();
    let _arrived = bar_0.arrive();
    bar_0.wait_parity(0u32);
}

/// Waits for the tiles of step `i` of a two-stage walk (see [`copy_next`]; step 0's committed to
/// `bar_0` by the caller) and returns their first row in the tiles.
#[cube]
pub(super) fn wait_tiles(bar_0: &Shared<Barrier>, bar_1: &Shared<Barrier>, i: usize, #[comptime] rows: usize) -> usize {
    // Step `i` is phase `i / 2` of its half's barrier.
    let parity = u32::cast_from((i / 2) % 2);
    if i % 2 == 0 {
        bar_0.wait_parity(parity);
    } else {
        bar_1.wait_parity(parity);
    }
    (i % 2) * rows
}
